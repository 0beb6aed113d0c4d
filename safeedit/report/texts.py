"""Plain-language parts of the report that depend on what kind of run it was: which metrics lead the tables,
how to read them, and what the evidence does and does not support for the obligations a reader has in mind.

The wording maps evidence to obligations; it is not legal advice, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Obligation:
    name: str
    supports: str
    does_not_prove: str


@dataclass(frozen=True)
class KindText:
    title: str
    headline_metrics: tuple[str, ...]  # the metrics table's columns, in order
    per_task_prefixes: tuple[str, ...] = ()  # measured metrics starting with these follow, e.g. accuracy_<task>
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    reading: str = ""
    obligations: tuple[Obligation, ...] = ()


_ERASURE = Obligation(
    "Right to erasure (GDPR Art. 17) for personal data used in training",
    "The named training examples were targeted by an edit of the model; on those examples the edited model "
    "behaves like a model that never saw them (accuracy, confidence and membership-attack results against the "
    "retrained reference), and the files evaluated are the files named here (SHA-256).",
    "It does not prove that no information about the examples remains in the weights: the tests are behavioural "
    "and limited to the attacks and data sets evaluated. It does not cover copies of the data, other models, "
    "logs or backups, and it does not by itself establish that erasure was legally required or sufficient.",
)
_ROBUSTNESS = Obligation(
    "Accuracy, robustness and cybersecurity (EU AI Act Art. 15) and record keeping (Art. 12)",
    "The cost of the edit on the model's intended task is measured (retain and test accuracy), the edit is "
    "localised (share of weights changed, and none changed outside the mask for masked methods), and the run is "
    "reproducible from the recorded command, seeds and file hashes. Where section 4 shows attacks, whether the "
    "removal survives them (relearning on part of the forget data and on related data, rounding the weights to "
    "int8 and int4, the kind's own attacks) is measured for every result, the reference included.",
    "It does not assess robustness to inputs or attacks not evaluated here: the attacks of section 4 have a "
    "stated budget, and a longer or stronger attack may recover more. One run on one seed does not give a "
    "confidence interval; the benchmarks in the project repeat the measurement over seeds.",
)

_CONCEPT = Obligation(
    "Requests to stop generating a class or concept (copyright, likeness, content policy)",
    "Samples generated for the removed class are, by a separately trained judge, no longer that class, while "
    "samples of the other classes keep their quality (retain accuracy, Fréchet distance), on the recorded files.",
    "It does not show that the class cannot be produced in other ways (other conditions, guidance scales, "
    "samplers, fine-tuning or adversarial prompts), nor that the training images were erased from the weights.",
)

_SAFETY = Obligation(
    "Restoring a model's safety behaviour after a user fine-tune (platform policy, EU AI Act Art. 15 and 55)",
    "On held-out harmful prompts the edited model refuses more often than the fine-tuned model did (harmful score, "
    "judged by the recorded judge whose accuracy on labelled refusals is stated), the user's task accuracy is "
    "measured on its test split, and the edit is a recorded mask of removed weights applied in one shot.",
    "It does not show that harmful content cannot be elicited by other prompts, jailbreaks, sampling settings or "
    "further fine-tuning; refusal is judged automatically, not by people; and the compliant answers of the attack "
    "data are templates, so the harm measured is willingness to comply, not the quality of harmful content.",
)

KINDS: dict[str, KindText] = {
    "harmful-finetune-defence": KindText(
        title="Removal of harmful behaviour learned in a fine-tune",
        headline_metrics=("harmful_score", "finetune_accuracy", "benign_refusal_rate", "weights_zeroed"),
        higher_is_better={"finetune_accuracy": True},
        reading=(
            "A safety-aligned chat model was fine-tuned on a user's task data that contained harmful requests "
            "paired with compliant answers. Harmful score is the share of held-out harmful prompts the model "
            "answers instead of refusing (lower is safer); fine-tune accuracy is the user's task on its test split "
            "(the cost); benign refusal rate is the share of held-out harmless requests refused (over-refusal). "
            "'original' is the aligned model before the user fine-tune, 'no_defense' the fine-tuned model."
        ),
        obligations=(_SAFETY, _ROBUSTNESS),
    ),
    "classification-unlearning": KindText(
        title="Removal of training data from a classifier",
        headline_metrics=("ua", "ra", "ta", "mia_efficacy", "gap_to_retrain", "time_vs_retrain"),
        higher_is_better={"ra": True, "ta": True},
        reading=(
            "UA (unlearning accuracy) is the share of forget examples the model now gets wrong; a model retrained "
            "without them is the target, not 100% in general. RA and TA are accuracies on the kept training data "
            "and on unseen test data: the cost. MIA-efficacy is the share of forget examples a membership attack "
            "judges 'not in the training set'. Gap to retrain is the mean absolute difference to the reference (a "
            "model trained without the forget data) over UA, RA, TA and MIA-efficacy: lower is closer to exact "
            "unlearning."
        ),
        obligations=(_ERASURE, _ROBUSTNESS),
    ),
    "generation-unlearning": KindText(
        title="Removal of a class from an image generator",
        headline_metrics=("forgetting_accuracy", "retain_accuracy", "frechet_distance", "forget_class_share",
                          "time_vs_retrain"),
        reading=(
            "A classifier trained separately on real images judges generated samples. Forgetting accuracy is the "
            "share of samples generated for the forget class that it does not recognise as that class (higher = "
            "better forgotten); retain accuracy is the share of samples for the other classes recognised as the "
            "class asked for (the cost); the Fréchet distance compares the judge's features of generated and real "
            "images of the other classes (lower = closer to real images)."
        ),
        obligations=(_CONCEPT, _ROBUSTNESS),
    ),
}
_MERGE = Obligation(
    "Supply-chain security of third-party model components (EU AI Act Art. 15 cybersecurity, platform policy)",
    "Every task model that went into the merge is named by hash; on each task's held-out test split, the merged "
    "model's clean accuracy and the success rate of the planted trigger are measured for every method, with the "
    "masks that decided which fine-tuned weights were kept saved for inspection.",
    "It does not detect backdoors with other triggers, target classes or poison rates than the one evaluated, nor "
    "adaptive attackers who know the defence; the triggers DAM inverts are universal perturbations, not the "
    "attacker's trigger, and a low attack success rate here is not a proof that no backdoor remains.",
)
KINDS["merge-backdoor-defence"] = KindText(
    title="Merging task models without inheriting a backdoor",
    headline_metrics=("avg_accuracy", "backdoor_asr", "transfer_asr"),
    per_task_prefixes=("accuracy_", "asr_"),
    higher_is_better={"avg_accuracy": True},
    reading=(
        "Several task models fine-tuned from one pretrained body are merged into one body; each task keeps its own "
        "classification head. Average accuracy is the mean clean test accuracy over the tasks (higher is better); "
        "backdoor ASR is the attack success rate of the planted trigger on the backdoored task: the share of "
        "triggered test inputs, whose true class is not the target, classified as the target (lower is safer); "
        "transfer ASR is the same on the clean tasks. 'individual' is each task model on its own task; "
        "'frozen_encoder' the pretrained body with a linear probe per task, the floor a merge should stay above."
    ),
    obligations=(_MERGE, _ROBUSTNESS),
)
_OWN_MERGE = Obligation(
    "Provenance of a merged model (EU AI Act Art. 12 record keeping and Art. 53 technical documentation)",
    "The base model and every task model that went into the merge are named by SHA-256, with each model's weight "
    "and density, the method's options and the seed; the record lists which parameters were merged and which were "
    "kept from the base (and why), and the merged weights are hashed, so the merge can be repeated and checked.",
    "It does not show that the merged model is fit for any task beyond the evaluation sets given (none: no "
    "accuracy was measured), nor that a task model carried no backdoor other than the triggers named here.",
)
KINDS["model-merge"] = KindText(
    title="Merge of fine-tuned models",
    headline_metrics=("avg_accuracy", "backdoor_asr", "transfer_asr"),
    per_task_prefixes=("accuracy_", "asr_"),
    higher_is_better={"avg_accuracy": True},
    reading=(
        "Task models fine-tuned from one base model were merged into one model; each task is measured with its own "
        "head on the merged body, on the evaluation set the scenario gives. Average accuracy is the mean over the "
        "evaluated tasks (higher is better); an ASR is the share of triggered inputs, whose true class is not the "
        "trigger's target, classified as the target (lower is safer): backdoor ASR on the tasks named as carrying "
        "a trigger, transfer ASR on the others. 'individual' is each task model on its own task. The weight changes "
        "count the parameters each merge moved away from the base model."
    ),
    obligations=(_OWN_MERGE, _ROBUSTNESS),
)
_LLM_ERASURE = Obligation(
    "Right to erasure (GDPR Art. 17) and removal requests for facts a language model states about people or topics",
    "Questions about the forgotten people or facts were targeted by a recorded edit; on those questions the edited "
    "model's answers, answer probabilities and a membership attack are compared with the original and, where one "
    "exists, with a model fine-tuned without them (forget quality), while answers on retained questions and "
    "general fluency measure the cost; the files evaluated are named here by SHA-256.",
    "It does not prove that the facts cannot be recovered: other phrasings, indirect questions, sampling, "
    "fine-tuning or weight inspection may still surface them. The tests are behavioural, on the questions and the "
    "attack evaluated, and do not establish that erasure was legally required or sufficient.",
)
KINDS["llm-unlearning"] = KindText(
    title="Removal of facts from a language model",
    headline_metrics=("forget_quality", "truth_ratio_forget", "rouge_l_forget", "rouge_l_retain", "probability_forget",
                      "probability_retain", "model_utility", "mia_auc", "forget_accuracy", "retain_accuracy",
                      "perplexity"),
    higher_is_better={"forget_quality": True, "rouge_l_retain": True, "probability_retain": True,
                      "model_utility": True, "retain_accuracy": True},
    reading=(
        "Forget quality is the p-value of a Kolmogorov-Smirnov test between the truth ratios of the edited model "
        "and of a model fine-tuned without the forget data, on the forget questions: high (≥ 0.05) means the two "
        "cannot be told apart. The truth ratio compares the probability of wrong answers with that of the true "
        "answer reworded; on the forget set it is reported as mean min(R, 1/R), 1 meaning the model no longer "
        "prefers the truth. ROUGE-L recall measures how much of the true answer the model's greedy answer repeats "
        "(forget: lower is more forgotten; retain: the cost). Answer probability is the per-token probability of "
        "the true answer (forget: lower is more forgotten; retain: the cost). Model utility is the harmonic mean "
        "of answer probability, truth ratio and ROUGE-L on retained questions (those measured: the notes name "
        "them). The membership AUC (Min-k% probability) separates forget answers from answers the model never "
        "saw: 0.5 means no trace. For facts learned in pre-training, forget and retain accuracy are the shares of "
        "questions answered correctly, and perplexity on held-out Wikipedia text measures fluency; for your own "
        "files, perplexity is that of the retained answers (lower is better)."
    ),
    obligations=(_LLM_ERASURE, _ROBUSTNESS),
)
_REPAIR = Obligation(
    _SAFETY.name,
    "On the user's held-out harmful prompts the edited model refuses more often than the fine-tuned model as "
    "given (harmful score, judged by the recorded judge whose accuracy on labelled refusals is stated), the "
    "user's task is measured on the user's own labelled prompts, and the edit is a recorded mask of removed weights "
    "applied in one shot to the files named here (SHA-256).",
    "It does not show that harmful content cannot be elicited by other prompts, jailbreaks, sampling settings or "
    "further fine-tuning; refusal is judged automatically, not by people, and only on the prompts of the files "
    "given; how representative those are of the harm to prevent is the user's judgement.",
)
KINDS["harmful-finetune-repair"] = KindText(
    title="Repair of a fine-tuned chat model's safety behaviour",
    headline_metrics=("harmful_score", "finetune_accuracy", "finetune_rouge_l", "benign_refusal_rate",
                      "weights_zeroed"),
    higher_is_better={"finetune_accuracy": True, "finetune_rouge_l": True},
    reading=(
        "A chat model the user had already fine-tuned was repaired as given. Harmful score is the share of the "
        "user's held-out harmful prompts the model answers instead of refusing (lower is safer); fine-tune accuracy "
        "is the share of the user's task prompts answered with the expected label or answer (the cost), and "
        "fine-tune ROUGE-L, where expected answers are free text, how much of them the answers recall; benign "
        "refusal rate, where harmless prompts were given, is the share of them refused (over-refusal). 'original' "
        "is the fine-tuned model as given, 'base' (when given) the model before that fine-tune."
    ),
    obligations=(_REPAIR, _ROBUSTNESS),
)
DEFAULT_KIND = KindText(title="Model edit", headline_metrics=(), obligations=(_ROBUSTNESS,))


def kind_text(kind: str) -> KindText:
    return KINDS.get(kind, DEFAULT_KIND)


def headline_metrics(kind: str, measured: set[str] | list[str]) -> list[str]:
    """The table columns of a kind: its headline metrics that were measured, then its per-task metrics."""
    text = kind_text(kind)
    columns = [m for m in text.headline_metrics if m in measured]
    for prefix in text.per_task_prefixes:
        columns += sorted(m for m in measured if m.startswith(prefix) and m not in columns)
    return columns
