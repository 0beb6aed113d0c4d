"""The reference rows of every kind of job, in plain words: the record's `about` for rows that are not methods
(a method's own summary and limitations travel with its registration, `safeedit.methods`)."""

from __future__ import annotations

from safeedit.unlearn.reference import FROM_BASE, FROM_SCRATCH, GIVEN, NONE

_NOT_A_METHOD = "Reference only; not a method."

REFERENCES: dict[str, dict[str, dict[str, str]]] = {
    "classification": {
        "original": {"summary": "the model before any edit",
                     "limitations": "Reference only; not an unlearning method."},
        "retrain": {"summary": "trained from scratch on the retain set only: what exact unlearning would produce",
                    "limitations": "One retrained model from one seed; retrained models differ from each other too "
                                   "(the noise floor of 'gap to retrain' is measured in benchmarks/salun.py)."},
    },
    "generation": {
        "original": {"summary": "the generator before any edit", "limitations": _NOT_A_METHOD},
        "retrain": {"summary": "trained from scratch without the forget class: what exact unlearning would produce",
                    "limitations": "One retrained model from one seed, trained with the original recipe."},
    },
    "llm-unlearning": {
        "original": {"summary": "the model before unlearning", "limitations": _NOT_A_METHOD},
        "retrain": {"summary": "the base model fine-tuned on the retain authors only: what exact unlearning would "
                               "give",
                    "limitations": "One fine-tune on one seed; the retrain-vs-retrain spread is measured in "
                                   "benchmarks/wagle.py."},
    },
    "pruning": {
        "original": {"summary": "the safety-aligned model before the user's fine-tune", "limitations": _NOT_A_METHOD},
        "no_defense": {"summary": "the model after the user's poisoned fine-tune, with no defence",
                       "limitations": "Reference only: the damage every defence starts from."},
    },
    "merge": {
        "frozen_encoder": {"summary": "the pretrained body, frozen, with a linear probe per task on clean data: the "
                                      "floor", "limitations": _NOT_A_METHOD},
    },
}

# The classifier's `retrain` row as what its reference was (record.reference.kind; safeedit.unlearn.reference).
_ONE_SEED = ("One reference from one seed; models trained without the data differ from each other too (the noise floor "
             "of 'gap to retrain' is measured in benchmarks/salun.py).")
CLASSIFICATION_REFERENCES: dict[str, dict[str, str]] = {
    FROM_SCRATCH: REFERENCES["classification"]["retrain"],
    FROM_BASE: {"summary": "the model's base checkpoint fine-tuned on the retain set only: the same model trained "
                           "without the forget data",
                "limitations": _ONE_SEED + " The fine-tune follows the recipe recorded, which may differ from how the "
                               "model itself was trained."},
    GIVEN: {"summary": "a model you trained without the forget data, loaded as given",
            "limitations": "How it was trained is the supplier's statement; this run checked its architecture and "
                           "labels, hashed it and evaluated it, and did not time its training."},
}

# What the record's notes say about the reference, per kind (`{...}` filled by the runner).
CLASSIFICATION_REFERENCE_NOTES: dict[str, str] = {
    FROM_SCRATCH: "Reference: {model} retrained from a seeded random initialisation on the {retain} retain examples "
                  "only ({recipe}; seed {seed}).",
    FROM_BASE: "Reference: the base checkpoint {source} fine-tuned on the {retain} retain examples only, never the "
               "forget examples ({recipe}; seed {seed}); what the base lacks ({initialised}) started from the seeded "
               "initialisation.",
    GIVEN: "Reference: the model in {source} (weights SHA-256 {sha256}), trained by its supplier without the forget "
           "data; this run did not train it, so time vs retrain is not measured.",
    NONE: "No reference model (reference: none): gap to retrain and time vs retrain are not measured, there is no "
          "reference row in the tables and plots, and no criterion can compare with one; how close the methods come "
          "to a model trained without the forget data is unknown.",
}
# Added to the from-scratch note for a model that is not embedded: it was most likely fine-tuned from a checkpoint.
SCRATCH_FOR_FINE_TUNED = ("For a model fine-tuned from a pretrained checkpoint, reference: {from: BASE} (the base "
                          "fine-tuned on the retain rows) is the model trained without the data.")

# The `about` of the reference row (`retrain`) when the user gives the reference model (`reference: {model: PATH}`).
GIVEN_REFERENCE = {
    "summary": "your reference model (reference.model), trained without the forget data: what exact unlearning "
               "would give",
    "limitations": "Trained by you, not by this run: the record names its files by SHA-256, but that it never saw "
                   "the forget data is your statement. It is scored with the model's tokenizer.",
}

# A repair of the user's own fine-tuned model (`harmful-finetune` with `calibration:`): no alignment, no attack.
REPAIR_REFERENCES: dict[str, dict[str, str]] = {
    "original": {"summary": "your fine-tuned model as given, before any edit: what every method prunes",
                 "limitations": _NOT_A_METHOD},
    "base": {"summary": "the model before your fine-tune (base:), as given",
             "limitations": "Reference only: how the model behaved before the fine-tune; target: update moves the "
                            "selected weights back to their values here."},
}
