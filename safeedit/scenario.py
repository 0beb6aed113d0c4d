"""Scenarios: a YAML file that states a forget request and how to answer it, validated, then run.

    safeedit run scenarios/digits-forget-class.yaml [--out DIR]

`kind` picks the job (default `classification`: forget data from a classifier; `generation`: forget a class
in a conditional diffusion model; `harmful-finetune`: remove harmful behaviour a fine-tune taught a chat model;
`merge-backdoor`: merge task models without inheriting a backdoor; `merge`: merge models you already fine-tuned;
`llm-unlearning`: remove facts from a language model);
each kind has its own strict schema (unknown keys are errors) and runner in
`safeedit.runners`, and every runner writes weights, masks and `record.json` into the output folder.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_serializer, model_validator

from safeedit.attacks.backdoor import TriggerSpec
from safeedit.config import Seed, Strict, stated
from safeedit.criteria import Criterion, check_metrics, check_names
from safeedit.data.forget import ForgetRequest
from safeedit.data.prompts import SafetySizes
from safeedit.data.qa_files import QAFiles, read_qa_files
from safeedit.errors import SafeEditError, first_problem
from safeedit.eval.language import qa_metric_names
from safeedit.io import read_yaml_mapping
from safeedit.methods import MethodSpec, get_method, resolve
from safeedit.models.encoders import FinetuneRecipe
from safeedit.models.lm_training import FinetuneOptions
from safeedit.prune import PruningOptions
from safeedit.robustness import RobustnessOptions
from safeedit.robustness.language_names import language_metric_names, probe_names
from safeedit.unlearn.diffusion import DiffusionRetrainOptions
from safeedit.unlearn.methods import RetrainOptions
from safeedit.unlearn.reference import (
    NONE,
    SCRATCH,
    ReferencePlan,
    ReferenceSection,
    from_retrain,
    parse_reference,
    plan_reference,
    stated_reference,
)
from safeedit.unlearn.wagle import LMUnlearnDefaults


class Request(Strict):
    what: str = Field(description="what must be removed, in the requester's words")
    requested_by: str = "unspecified"
    reason: str = ""
    date: dt.date | str | None = None


class Recipe(Strict):
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(default=64, ge=1)


class ModelSection(Strict):
    name: str = Field(description="embedded model, a folder with config.json + safetensors, or a hub id")
    weights: str | None = None
    recipe: Recipe | None = Field(default=None, description="training recipe, needed to retrain non-embedded models")
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16", "stored"] = Field(
        default="float32", description="language models (llm-unlearning, harmful-finetune): the weights' dtype in "
        "memory; stored = the checkpoint's own (a bf16 checkpoint stays bf16, half fp32's memory)")

    @model_serializer(mode="wrap")
    def _stated(self, handler: Any) -> dict[str, Any]:
        return stated(handler(self), self, ("dtype",))


# The kinds whose model is a language model loaded by `load_language_model` (the only ones `model.dtype` applies to).
LANGUAGE_KINDS = ("llm-unlearning", "harmful-finetune")


class DataSection(Strict):
    source: str = Field(description="embedded data set, local file or folder, or hub id")
    train_split: str = "train"
    test_split: str | float = Field(default="test", description="a split name, or a fraction in (0, 1) of the "
                                    "training split held out (seeded by the scenario seed) as the test set")

    @field_validator("test_split")
    @classmethod
    def _fraction(cls, value: str | float) -> str | float:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"{value} is neither a split name nor a fraction in (0, 1) such as 0.2")
        return value


class Evaluation(Strict):
    batch_size: int = Field(default=256, ge=1)
    max_mia_examples: int = Field(default=5000, ge=10)


def _with_overrides(defaults: dict[str, Any], overrides: dict[str, Any], options: type[BaseModel]) -> dict[str, Any]:
    """`defaults` updated by `overrides`, where an override given under any name of a field (`mask_ratio`, the old
    name of `ratio`) replaces the default of that field."""
    merged = dict(defaults)
    for name, field in options.model_fields.items():
        names = {name, *(c for c in getattr(field.validation_alias, "choices", []) if isinstance(c, str))}
        if names & set(overrides):
            for alias in names:
                merged.pop(alias, None)
    return {**merged, **overrides}


class ScenarioCore(Strict):
    """What every kind of scenario has: a name, the request in words, pass/fail criteria, a seed, CPU threads."""

    name: str = Field(description="names the output folder: letters, digits, _ . - (not . or - first)")
    description: str = ""
    request: Request
    criteria: list[Criterion] = Field(default_factory=list, description="pass/fail checks the report's verdict uses")
    seed: Seed = 0
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (tiny models: 1 is fastest)")
    robustness: RobustnessOptions | None = Field(
        default=None, description="attack every result after the edit (relearning, quantization, the kind's own "
        "attacks; safeedit.robustness); absent: not attacked")

    # The kind of method the scenario's `methods:` names (safeedit.methods), and whether `<method>+<mask score>`
    # names are allowed (language-model objectives confined to a mask).
    method_kind: ClassVar[str]
    masked_names: ClassVar[bool] = False

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not re.fullmatch(r"\w[\w.\-]{0,99}", name):
            raise ValueError(f"{name!r} cannot name an output folder; use up to 100 letters, digits, _ . - and "
                             "start with a letter, digit or _")
        return name

    @model_serializer(mode="wrap")
    def _as_stated(self, handler: Any) -> dict[str, Any]:
        """The scenario as stated: `robustness` only when given (records written before it keep their shape), then
        the kind's own choices (`_stated_fields`)."""
        data = handler(self)
        if data.get("robustness") is None:
            data.pop("robustness", None)
        return self._stated_fields(data)

    def _stated_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def method_defaults(self, spec: MethodSpec) -> dict[str, Any]:
        """Options method `spec` starts from before its own overrides (e.g. the scenario's `pruning:` section)."""
        return {}

    def check_inputs(self) -> None:
        """Read and check the files the scenario names, before any model loads (default: nothing to read here)."""

    def method_spec(self, name: str) -> MethodSpec:
        """The registered method `name` (for `<objective>+<mask>` names, the objective's)."""
        try:
            return resolve(self.method_kind, name).spec if self.masked_names else get_method(self.method_kind, name)
        except SafeEditError as error:
            raise SafeEditError(f"scenario '{self.name}': {error}") from None

    def method_options(self) -> dict[str, BaseModel]:
        """Each method's validated options; an unknown method, mask score or option is one line naming it."""
        options = {}
        for name, given in self.methods.items():
            spec = self.method_spec(name)
            overrides = given.model_dump(exclude_none=True) if isinstance(given, BaseModel) else given or {}
            options[name] = spec.validate(_with_overrides(self.method_defaults(spec), overrides, spec.options),
                                          f"scenario '{self.name}'")
        return options


class ScenarioBase(ScenarioCore):
    model: ModelSection
    data: DataSection
    forget: ForgetRequest
    methods: dict[str, dict[str, Any] | None] = Field(min_length=1)

    def result_names(self) -> set[str]:
        return {"original", *self.methods, *(["retrain"] if getattr(self, "retrain", None) is not None else [])}


class Scenario(ScenarioBase):
    """Forget data from a classifier (`kind: classification`, the default)."""

    kind: Literal["classification"] = "classification"
    method_kind: ClassVar[str] = "classification"
    reference: ReferenceSection | None = Field(
        default=None, description="the model trained without the forget data: {from: BASE | scratch, epochs, lr, "
        "...}, {model: PATH} or none; see safeedit.unlearn.reference")
    retrain: RetrainOptions | None = Field(default=None, description="older name of reference: {from: scratch, ...} "
                                                                     "(null: reference: none); kept as stated")
    evaluation: Evaluation = Evaluation()
    _reference_plan: ReferencePlan = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _parse_reference(cls, raw: Any) -> Any:
        return stated_reference(raw) if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _plan_reference(self) -> Scenario:
        stated = self.model_fields_set
        section = (self.reference if "reference" in stated else from_retrain(self.retrain) if "retrain" in stated
                   else None)
        recipe = self.model.recipe.model_dump() if self.model.recipe else None
        self._reference_plan = plan_reference(section, self.model.name, recipe)
        if section is None:  # unstated: the record's scenario names the default that ran
            self.reference = parse_reference({"from": SCRATCH})
        return self

    def _stated_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        """`retrain:` where the scenario used the older name (records written before `reference:` read back
        unchanged), `reference:` otherwise."""
        data.pop("reference" if "retrain" in self.model_fields_set else "retrain", None)
        return data

    def reference_plan(self) -> ReferencePlan:
        """The reference this scenario asks for, resolved (recipe complete, paths checked)."""
        return self._reference_plan

    def result_names(self) -> set[str]:
        return {"original", *self.methods, *(["retrain"] if self._reference_plan.kind != NONE else [])}


class JudgeSection(Strict):
    name: str = Field(description="a classifier of the real images: embedded name, folder or hub id")
    weights: str | None = None


class GenerationEvaluation(Strict):
    per_class: int = Field(default=100, ge=2, description="samples generated per class")
    sampling_steps: int = Field(default=50, ge=1, description="DDIM steps")
    guidance: float = Field(default=1.0, ge=0, description="classifier-free guidance scale (1 = plain conditional)")


class PruningOverrides(Strict):
    ratio: float | None = Field(default=None, gt=0, le=1)
    layers: str | None = None
    target: Literal["weights", "update"] | None = None


class AttackSection(Strict):
    """The user's fine-tune: the task data mixed with harmful requests answered compliantly."""

    poison_ratio: float = Field(default=0.1, ge=0, lt=1)
    finetune: FinetuneOptions = FinetuneOptions()


class SafetyEvaluation(Strict):
    """How answers are generated and, when a user's own model is repaired, the prompt files it is measured on
    (formats: `safeedit.data.prompt_files`)."""

    max_new_tokens: int = Field(default=32, ge=4, description="greedy answer length judged for refusal")
    harmful: str | None = Field(default=None, description="your model: file of held-out harmful prompts (the "
                                                          "harmful score: share answered without refusal)")
    task: str | None = Field(default=None, description="your model: file of your task's prompts with the label or "
                                                       "answer each should get (finetune_accuracy)")
    benign: str | None = Field(default=None, description="your model (optional): file of harmless prompts "
                                                         "(benign_refusal_rate: over-refusal)")
    task_max_new_tokens: int | None = Field(default=None, ge=1, description="task answer length (default: 8 "
                                                                            "for labels, max_new_tokens for answers)")

    @model_serializer(mode="wrap")
    def _stated(self, handler: Any) -> dict[str, Any]:
        """The files only when given (records of the demonstration keep their shape)."""
        return {key: value for key, value in handler(self).items()
                if value is not None or key not in ("harmful", "task", "benign", "task_max_new_tokens")}


# The sections only the embedded demonstration reads (it builds the fine-tune to repair), and those only a repair
# of the user's own fine-tuned model reads.
DEMONSTRATION_ONLY = ("alignment", "attack", "data")
OWN_MODEL_ONLY = ("base", "harmful", "task", "benign")


class SafetyScenario(ScenarioCore):
    """Remove harmful behaviour a user fine-tune taught an aligned chat model (`kind: harmful-finetune`).

    Two settings. The demonstration (no `calibration:`): `model` is a chat model that is safety-aligned
    (`alignment`), then fine-tuned on poisoned task data (`attack`, prompts cut from the offline sources by
    `data`). Your own model (`calibration:` a file of harmful prompts): `model` is your fine-tuned chat model,
    repaired as given, `base` (optional) the model before your fine-tune (needed by `target: update`), and
    `evaluation` names the files it is measured on; no alignment or attack runs.
    """

    kind: Literal["harmful-finetune"]
    method_kind: ClassVar[str] = "pruning"
    model: ModelSection = Field(description="demonstration: the chat model to align and fine-tune; your model: "
                                            "your fine-tuned chat model, repaired as given")
    base: ModelSection | None = Field(default=None, description="your model: the model before your fine-tune "
                                                                "(target: update resets weights to it)")
    calibration: str | None = Field(default=None, description="your model: file of harmful prompts the wanda scores "
                                                              "are read on (disjoint from evaluation.harmful)")
    alignment: FinetuneOptions | None = Field(
        default=FinetuneOptions(), description="safety alignment before the user fine-tune (cached); null: skip")
    attack: AttackSection = AttackSection()
    data: SafetySizes = SafetySizes()
    pruning: PruningOptions = PruningOptions()
    methods: dict[str, PruningOverrides | None] = Field(min_length=1)
    judge: str = Field(default="default", description="default | phrases | folder of a refusal classifier")
    evaluation: SafetyEvaluation = SafetyEvaluation()

    @field_validator("model", "base", mode="before")
    @classmethod
    def _folder(cls, value: Any) -> Any:
        """`model: FOLDER` is short for `model: {name: FOLDER}`."""
        return {"name": value} if isinstance(value, str) else value

    @property
    def own_model(self) -> bool:
        """True when `model` is the user's fine-tuned model, repaired as given (no alignment, no attack)."""
        return self.calibration is not None

    @model_validator(mode="after")
    def _one_setting(self) -> SafetyScenario:
        if self.own_model:
            given = [key for key in DEMONSTRATION_ONLY if key in self.model_fields_set and getattr(self, key)]
            if given:
                raise ValueError(f"{given[0]}: belongs to the demonstration, which builds its own fine-tune; with "
                                 f"calibration: your model is repaired as given, so remove {', '.join(given)}")
            missing = [f"evaluation.{key}" for key in ("harmful", "task") if getattr(self.evaluation, key) is None]
            if missing:
                raise ValueError(f"{missing[0]}: missing; repairing your own model needs evaluation.harmful (a "
                                 "file of held-out harmful prompts) and evaluation.task (your task's prompts with "
                                 "labels or answers)")
        else:
            given = [key for key in OWN_MODEL_ONLY
                     if (self.base if key == "base" else getattr(self.evaluation, key)) is not None]
            if given:
                where = given[0] if given[0] == "base" else f"evaluation.{given[0]}"
                raise ValueError(f"{where}: repairs your own fine-tuned model and needs calibration: a file of "
                                 "harmful prompts (without it, the scenario is the embedded demonstration)")
        return self

    def _stated_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        """The sections of the setting the scenario is in (records of the demonstration keep their shape)."""
        unused = DEMONSTRATION_ONLY if self.own_model else ("base", "calibration")
        return {key: value for key, value in data.items() if key not in unused}

    def method_defaults(self, spec: MethodSpec) -> dict[str, Any]:
        return self.pruning.model_dump()

    def method_options(self) -> dict[str, BaseModel]:
        options = super().method_options()
        if self.own_model:
            updates = [name for name, method in options.items() if getattr(method, "target", None) == "update"]
            if updates and self.base is None:
                where = ("pruning.target" if self.pruning.target == "update" and "target" not in
                         (self.methods[updates[0]] or PruningOverrides()).model_fields_set
                         else f"methods.{updates[0]}.target")
                raise SafeEditError(f"scenario '{self.name}': {where}: update prunes your fine-tune's update and "
                                    "needs base: the model before the fine-tune; add base: FOLDER, or use "
                                    "target: weights")
            if "wanda_benign" in options:
                raise SafeEditError(f"scenario '{self.name}': methods.wanda_benign is calibrated on harmless prompts, "
                                    "which only the demonstration provides; remove it (antidote, random_prune and "
                                    "magnitude_prune run on your model)")
        return options

    def result_names(self) -> set[str]:
        if self.own_model:
            return {"original", *(["base"] if self.base is not None else []), *self.methods}
        return {"original", "no_defense", *self.methods}


class EncoderSection(Strict):
    name: str = Field(description="embedded body (all-minilm-l6-v2 | vit-tiny-mnist-rotation), folder or hub id")
    modality: Literal["text", "image"]
    max_length: int = Field(default=64, ge=8, description="text: tokens per example")


class MergeTasks(Strict):
    names: list[str] = Field(min_length=2, description="embedded task names or save_to_disk folders (train/test)")
    max_train: int = Field(default=800, ge=10, description="examples per task model's fine-tune")
    max_test: int = Field(default=400, ge=10)
    unlabeled: int = Field(default=128, ge=8, description="unlabeled train examples per task for the learned "
                                                           "merges (never used to fine-tune)")
    batch_size: int = Field(default=16, ge=1, description="unlabeled examples per task in each learned-merge step")


def embedded_tasks(modality: str) -> dict[str, str]:
    """The embedded tasks of a modality (name -> description), as `runners.merging.load_tasks` reads them."""
    if modality == "text":
        from safeedit.data.text_tasks import TEXT_TASKS

        return TEXT_TASKS
    from safeedit.data.vision_tasks import VISION_TASKS

    return VISION_TASKS


class MergeScenario(ScenarioCore):
    """Merge task models, some backdoored, and keep the tasks without the backdoor (`kind: merge-backdoor`)."""

    kind: Literal["merge-backdoor"]
    method_kind: ClassVar[str] = "merge"
    model: EncoderSection
    tasks: MergeTasks
    finetune: FinetuneRecipe = FinetuneRecipe()
    attacks: dict[str, TriggerSpec] = Field(default_factory=dict, description="task -> its backdoor trigger")
    methods: dict[str, dict[str, Any] | None] = Field(min_length=1)

    def method_options(self) -> dict[str, BaseModel]:
        embedded = embedded_tasks(self.model.modality)
        unknown = [name for name in self.tasks.names if name not in embedded and not Path(name).is_dir()]
        if unknown:
            raise SafeEditError(f"scenario '{self.name}': tasks.names: {unknown[0]!r} is neither an embedded "
                                f"{self.model.modality} task ({', '.join(embedded)}) nor a save_to_disk folder")
        for name in self.tasks.names:
            if name not in embedded and (Path(name) / "config.json").is_file():
                raise SafeEditError(f"scenario '{self.name}': tasks.names: {name!r} is a model folder; merge-backdoor "
                                    "fine-tunes its own task models from task data. To merge models you already "
                                    "fine-tuned, write kind: merge with base_model and models: [{model: FOLDER}] "
                                    "(see scenarios/examples/merge-own-models.yaml)")
            if name not in embedded and not (Path(name) / "dataset_dict.json").is_file():
                raise SafeEditError(f"scenario '{self.name}': tasks.names: {name!r} is a folder but not a data set "
                                    "saved with DatasetDict.save_to_disk (no dataset_dict.json); save the task's "
                                    "train and test splits with save_to_disk")
        unknown = [task for task in self.attacks if task not in self.tasks.names]
        if unknown:
            raise SafeEditError(f"scenario '{self.name}': attacks.{unknown[0]} names no task; choose from "
                                f"{', '.join(self.tasks.names)}")
        if self.robustness is not None and not self.attacks:
            raise SafeEditError(f"scenario '{self.name}': robustness: attacks the backdoor a merge inherits, and "
                                "no task is backdoored; name one under attacks:, or drop robustness:")
        return super().method_options()

    def result_names(self) -> set[str]:
        return {"frozen_encoder", *self.methods}


class MergeModel(Strict):
    """One task model of a `kind: merge` scenario: a fine-tune of `base_model`, its weight and density in the
    data-free merges, and its own data for the learned merges and the evaluation."""

    model: str = Field(description="a fine-tune of base_model: a save_pretrained folder or a hub id")
    name: str | None = Field(default=None, description="the task's name in metrics (default: the folder's name)")
    weight: float = Field(default=1.0, description="wᵢ in task_arithmetic, ties and dare (mergekit's weight)")
    density: float | None = Field(default=None, gt=0, le=1, description="share of this task vector kept by ties "
                                  "and dare, in place of the method's keep/density (mergekit's density)")
    unlabeled: str | None = Field(default=None, description="data spec of the task's unlabeled texts (a text "
                                  "column): all that adamerging, concrete_ta and dam see")
    evaluation: str | None = Field(default=None, description="data spec of labelled test examples (text, label): "
                                   "accuracy, and the attack success rate of the known triggers")
    trigger: TriggerSpec | None = Field(default=None, description="a trigger known or feared to be planted in this "
                                        "model; its attack success rate is measured on every evaluation set")

    @field_validator("name")
    @classmethod
    def _metric_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"\w[\w.\-]{0,99}", name):
            raise ValueError(f"{name!r} cannot name a task in metrics; use letters, digits, _ . -")
        return name

    def task_name(self) -> str:
        return self.name or re.sub(r"[^\w.\-]", "_", Path(self.model.rstrip("/")).name) or "task"


class ModelMergeScenario(ScenarioCore):
    """Merge models you already fine-tuned from one base model (`kind: merge`; `safeedit merge` writes one)."""

    kind: Literal["merge"]
    method_kind: ClassVar[str] = "merge"
    base_model: str = Field(description="the model every task model was fine-tuned from: folder or hub id")
    models: list[MergeModel] = Field(min_length=1)
    merge_heads: bool = Field(default=False, description="also merge classifier heads (only for task models "
                              "fine-tuned for the same labels)")
    exclude: str | None = Field(default=None, description="regular expression of parameter names kept from the "
                                "base model")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="dtype of the written merges (default: the base model's); arithmetic is float32")
    max_length: int = Field(default=128, ge=8, description="text: tokens per example")
    batch_size: int = Field(default=16, ge=1, description="examples per batch (learned merges, evaluation)")
    trust_remote_code: bool = False
    methods: dict[str, dict[str, Any] | None] = Field(min_length=1)

    @field_validator("exclude")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return pattern

    def tasks(self) -> dict[str, MergeModel]:
        """The task models by task name."""
        return {entry.task_name(): entry for entry in self.models}

    def method_options(self) -> dict[str, BaseModel]:
        from safeedit.merge.methods import LEARNED
        from safeedit.merge.own import check_data_spec, check_model_spec, check_same_base

        where = f"scenario '{self.name}'"
        names = [entry.task_name() for entry in self.models]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice:
            raise SafeEditError(f"{where}: two task models are named {twice!r}; give each a name: in models")
        check_model_spec(self.base_model, f"{where}: base_model")
        for index, entry in enumerate(self.models):
            check_model_spec(entry.model, f"{where}: models[{index}].model")
            for role in ("unlabeled", "evaluation"):
                if getattr(entry, role) is not None:
                    check_data_spec(getattr(entry, role), f"{where}: models[{index}].{role}")
        check_same_base(self.base_model, {entry.task_name(): entry.model for entry in self.models})
        options = super().method_options()
        for method in self.methods:
            if method in LEARNED:
                lacking = next((i for i, entry in enumerate(self.models) if entry.unlabeled is None), None)
                if lacking is not None:
                    raise SafeEditError(f"{where}: methods.{method} learns from unlabeled data of every task model; "
                                        f"models[{lacking}] ({names[lacking]}) has none: add models[{lacking}]."
                                        "unlabeled: FILE (a text column; no labels needed), or drop the method")
        triggered = next((i for i, entry in enumerate(self.models) if entry.trigger is not None), None)
        if triggered is not None and all(entry.evaluation is None for entry in self.models):
            raise SafeEditError(f"{where}: models[{triggered}].trigger: the attack success rate is measured on "
                                "evaluation sets; give models[i].evaluation: FILE (text, label)")
        if self.robustness is not None:
            if triggered is None:
                raise SafeEditError(f"{where}: robustness: attacks the backdoor a merge may inherit, and no model "
                                    "has a trigger; give models[i].trigger (and models[i].evaluation), or drop "
                                    "robustness:")
            lacking = next((i for i, e in enumerate(self.models) if e.trigger is not None and e.evaluation is None),
                           None)
            if lacking is not None:
                raise SafeEditError(f"{where}: robustness: the attacker's poisoned examples are drawn from the "
                                    f"evaluation set of each model with a trigger; give models[{lacking}].evaluation:"
                                    " FILE (text, label)")
        return options

    def result_names(self) -> set[str]:
        return set(self.methods)


class AuthorsSection(Strict):
    """Fictitious authors (TOFU-style): the model to unlearn is fine-tuned on all of them, the reference on the
    retain authors only; a few more authors are never trained on (non-members for the membership attack)."""

    protocol: Literal["fictitious-authors"]
    authors: int = Field(default=20, ge=2)
    questions_per_author: int = Field(default=10, ge=1)
    holdout_authors: int = Field(default=2, ge=1)
    forget_ratio: float = Field(default=0.1, gt=0, lt=1, description="share of the trained authors forgotten")
    perturbed: int = Field(default=3, ge=1, description="wrong answers per question (truth ratio)")
    seed: Seed = Field(default=0, description="the people and their facts")
    split_seed: Seed | None = Field(default=None, description="which authors are forgotten (default: seed)")


class CapitalsSection(Strict):
    """Country capitals the pretrained model already knows (gensim's questions-words.txt): forget some, keep the
    rest, and keep fluency on held-out Wikipedia text."""

    protocol: Literal["capitals"]
    forget: int = Field(default=10, ge=1, description="known capitals to forget")
    seed: Seed = Field(default=0, description="which known capitals are forgotten, and the fluency texts")
    fluency_texts: int = Field(default=40, ge=1, description="held-out Wikipedia summaries for perplexity")


class QAFilesSection(Strict):
    """Your own question-answer files (JSON Lines; the row format is in `safeedit.data.qa_files`): the model named in
    `model` is unlearned as it is. Paths are relative to the working folder."""

    protocol: Literal["files"] = Field(description="implied when the section names a retain file")
    forget: str = Field(description="questions and answers to forget (.jsonl, .json or .csv)")
    retain: str = Field(description="questions and answers to keep (the objectives' retain term, retain metrics)")
    holdout: str | None = Field(default=None, description="questions and answers the model never saw: the "
                                                          "membership attack's non-members (mia_auc)")
    perturbed: str | None = Field(default=None, description="wrong answers by question (truth ratio, forget "
                                                            "quality); or 'perturbed' in each forget row")


class LMReference(Strict):
    model: str = Field(description="your model fine-tuned without the forget data (a save_pretrained folder): the "
                                   "reference of forget quality")


class LMEvaluation(Strict):
    max_new_tokens: int = Field(default=48, ge=4, description="greedy answer length (ROUGE-L, accuracy)")
    retain_questions: int = Field(default=40, ge=1, description="retain questions evaluated (a seeded subset)")
    batch_size: int = Field(default=16, ge=1)
    min_k: float = Field(default=0.4, gt=0, le=1,
                         description="k of the Min-k% probability attack (open-unlearning's TOFU config: 0.4)")


class LMScenario(ScenarioCore):
    """Remove facts from a causal language model, optionally confined to a weight mask (`kind: llm-unlearning`)."""

    kind: Literal["llm-unlearning"]
    method_kind: ClassVar[str] = "llm-unlearning"
    masked_names: ClassVar[bool] = True
    model: ModelSection
    data: AuthorsSection | CapitalsSection | QAFilesSection = Field(discriminator="protocol")
    reference: LMReference | None = Field(
        default=None, description="your own files: a model fine-tuned without the forget data (forget quality)")
    finetune: FinetuneOptions = Field(
        default=FinetuneOptions(lora_rank=0, epochs=5, lr=5e-5),
        description="fictitious authors: how the model to unlearn (all authors) and the reference (retain "
                    "authors) are fine-tuned from the base model; both cached")
    retrain: bool = Field(default=True, description="fictitious authors: fine-tune the retain-only reference")
    unlearning: LMUnlearnDefaults = LMUnlearnDefaults()
    methods: dict[str, dict[str, Any] | None] = Field(
        min_length=1, description="<objective>[+<mask score>] -> overrides of `unlearning`")
    evaluation: LMEvaluation = LMEvaluation()
    save_weights: list[str] | None = Field(
        default=None, description="methods whose edited weights are written (default: the first method)")

    _files: QAFiles | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _files_protocol(cls, raw: Any) -> Any:
        """`data: {forget: F.jsonl, retain: R.jsonl, ...}` without a protocol is `protocol: files`."""
        data = raw.get("data") if isinstance(raw, dict) else None
        if (isinstance(data, dict) and "protocol" not in data and not isinstance(data.get("forget"), int)
                and {"forget", "retain", "holdout", "perturbed"} & set(data)):
            return {**raw, "data": {"protocol": "files", **data}}
        return raw

    @model_validator(mode="after")
    def _sections_of_the_protocol(self) -> LMScenario:
        files = isinstance(self.data, QAFilesSection)
        if self.reference is not None and not files:
            raise ValueError(f"reference: applies to your own files (data: {{forget: ..., retain: ...}}); protocol "
                             f"{self.data.protocol} makes its own reference (retrain) or has none: remove reference")
        fields = type(self).model_fields
        own = [name for name in ("finetune", "retrain") if files and getattr(self, name) != fields[name].default]
        if own:
            raise ValueError(f"{own[0]}: applies to protocol fictitious-authors, which fine-tunes the model and its "
                             "reference; your own files unlearn the model as it is, and reference: {model: PATH} "
                             f"names your model fine-tuned without the forget data: remove {own[0]}")
        return self

    def _stated_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        """The scenario as stated: `reference` only when given (records of the other protocols keep their shape)."""
        if data.get("reference") is None:
            data.pop("reference", None)
        return data

    def qa_files(self) -> QAFiles:
        """Your own files, read and checked once (`check_inputs` reads them before any model loads)."""
        if self._files is None:
            data = self.data
            self._files = read_qa_files(data.forget, data.retain, data.holdout, data.perturbed)
        return self._files

    def check_inputs(self) -> None:
        if not isinstance(self.data, QAFilesSection):
            return
        files = self.qa_files()
        if self.reference is not None:
            from safeedit.models.language import check_reference_folder

            check_reference_folder(self.reference.model, self.model.name)
        measured = qa_metric_names(files.forget.has_perturbed(), files.retain.has_perturbed(),
                                   files.holdout is not None, self.reference is not None, retain_perplexity=True)
        if self.robustness is not None:
            measured |= language_metric_names("files", files.forget.has_perturbed(), self.reference is not None,
                                              self.robustness)
        perturbed = "give wrong answers for every forget question (data.perturbed, or 'perturbed' in each row)"
        fixes = {"mia_auc": "give data.holdout: questions and answers the model never saw",
                 "truth_ratio_forget": perturbed,
                 "forget_quality": perturbed if not files.forget.has_perturbed() else
                 "give reference: {model: PATH}, your model fine-tuned without the forget data",
                 "truth_ratio_retain": "give wrong answers for every retain question (data.perturbed, or "
                                       "'perturbed' in each row)",
                 **dict.fromkeys(("forget_accuracy", "retain_accuracy"), "it is measured for protocol: capitals")}
        check_metrics(self.criteria, measured, fixes)

    def method_defaults(self, spec: MethodSpec) -> dict[str, Any]:
        return LMUnlearnDefaults.for_method(self.unlearning, spec.options)

    def method_options(self) -> dict[str, BaseModel]:
        options = super().method_options()
        unknown = [m for m in self.save_weights or [] if m not in self.methods]
        if unknown:
            raise SafeEditError(f"scenario '{self.name}': save_weights names {unknown[0]!r}, which is not a method")
        return options

    def weights_to_save(self) -> list[str]:
        return self.save_weights if self.save_weights is not None else list(self.methods)[:1]

    def has_reference(self) -> bool:
        if isinstance(self.data, QAFilesSection):
            return self.reference is not None
        return isinstance(self.data, AuthorsSection) and self.retrain

    def result_names(self) -> set[str]:
        return {"original", *self.methods, *(["retrain"] if self.has_reference() else [])}


class GenerationScenario(ScenarioBase):
    """Forget a class in a class-conditional diffusion model (`kind: generation`)."""

    kind: Literal["generation"]
    method_kind: ClassVar[str] = "generation"
    judge: JudgeSection
    retrain: DiffusionRetrainOptions | None = DiffusionRetrainOptions()
    evaluation: GenerationEvaluation = GenerationEvaluation()


KINDS: dict[str, type[BaseModel]] = {"classification": Scenario, "generation": GenerationScenario,
                                     "harmful-finetune": SafetyScenario, "merge-backdoor": MergeScenario,
                                     "llm-unlearning": LMScenario, "merge": ModelMergeScenario}


# The kinds' own attacks (safety repair, LLM prompt probes; merges' remerge_* below): only the battery measures them.
_ATTACK_METRICS = {"steps_to_harmful"} | {name for protocol in ("fictitious-authors", "capitals", "files")
                                         for perturbed in (False, True)
                                         for name in probe_names(protocol, perturbed).values() if name}


def _battery_only(metric: str) -> bool:
    """Whether only the robustness battery measures `metric`."""
    return ("@" in metric or metric.endswith(("_int8", "_int4")) or metric.startswith("remerge_")
            or metric in _ATTACK_METRICS)


def check_attacked(scenario: ScenarioCore) -> None:
    """`robustness.results` names results the scenario produces; a criterion on a robustness metric needs the
    section."""
    options, names = scenario.robustness, scenario.result_names()
    unknown = sorted(set(options.results or []) - names) if options else []
    if unknown:
        raise SafeEditError(f"robustness.results names {unknown[0]!r}, which this scenario does not produce; choose "
                            f"from {', '.join(sorted(names))}")
    for criterion in scenario.criteria:
        robust = [m for m in criterion.metrics_named() if _battery_only(m)]
        if robust and options is None:
            raise SafeEditError(f"criterion {criterion.check!r} needs {robust[0]}, which only the robustness battery "
                                "measures; add a robustness: section (robustness: {} for the defaults)")


def load_scenario(path: str | Path) -> ScenarioCore:
    path = Path(path)
    if path.is_dir():
        raise SafeEditError(f"{path} is a folder; give a scenario YAML file, e.g. one in scenarios/")
    if not path.is_file():
        raise SafeEditError(f"{path}: no such scenario file; see scenarios/ for ready-made ones")
    raw = read_yaml_mapping(path, "a scenario is a YAML mapping with keys name, request, model, data, ...")
    kind = raw.get("kind", "classification")
    if kind not in KINDS:
        raise SafeEditError(f"{path}: kind: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    try:
        scenario = KINDS[kind](**raw)
    except pydantic.ValidationError as error:
        raise SafeEditError(f"{path}: {first_problem(error)}") from None
    scenario.method_options()
    if getattr(getattr(scenario, "model", None), "dtype", "float32") != "float32" and kind not in LANGUAGE_KINDS:
        raise SafeEditError(f"{path}: model.dtype applies to language models only ({', '.join(LANGUAGE_KINDS)}); "
                            f"remove it from this {kind} scenario")
    try:
        check_names(scenario.criteria, scenario.result_names())
        check_attacked(scenario)
        scenario.check_inputs()
    except SafeEditError as error:
        raise SafeEditError(f"{path}: {error}") from None
    return scenario
