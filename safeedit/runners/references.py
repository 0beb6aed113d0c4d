"""The reference rows of every kind of job, in plain words: the record's `about` for rows that are not methods
(a method's own summary and limitations travel with its registration, `safeedit.methods`)."""

from __future__ import annotations

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

# A repair of the user's own fine-tuned model (`harmful-finetune` with `calibration:`): no alignment, no attack.
REPAIR_REFERENCES: dict[str, dict[str, str]] = {
    "original": {"summary": "your fine-tuned model as given, before any edit: what every method prunes",
                 "limitations": _NOT_A_METHOD},
    "base": {"summary": "the model before your fine-tune (base:), as given",
             "limitations": "Reference only: how the model behaved before the fine-tune; target: update moves the "
                            "selected weights back to their values here."},
}
