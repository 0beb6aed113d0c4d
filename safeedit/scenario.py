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
import yaml
from pydantic import BaseModel, Field, field_validator

from safeedit.attacks.backdoor import TriggerSpec
from safeedit.config import Seed, Strict
from safeedit.criteria import Criterion, check_names
from safeedit.data.forget import ForgetRequest
from safeedit.data.prompts import SafetySizes
from safeedit.errors import SafeEditError, first_problem
from safeedit.methods import MethodSpec, get_method, resolve
from safeedit.models.encoders import FinetuneRecipe
from safeedit.models.lm_training import FinetuneOptions
from safeedit.prune import PruningOptions
from safeedit.unlearn.diffusion import DiffusionRetrainOptions
from safeedit.unlearn.methods import RetrainOptions
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

    def method_defaults(self, spec: MethodSpec) -> dict[str, Any]:
        """Options method `spec` starts from before its own overrides (e.g. the scenario's `pruning:` section)."""
        return {}

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
    retrain: RetrainOptions | None = RetrainOptions()
    evaluation: Evaluation = Evaluation()


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
    max_new_tokens: int = Field(default=32, ge=4, description="greedy answer length judged for refusal")


class SafetyScenario(ScenarioCore):
    """Remove harmful behaviour a user fine-tune taught an aligned chat model (`kind: harmful-finetune`)."""

    kind: Literal["harmful-finetune"]
    method_kind: ClassVar[str] = "pruning"
    model: ModelSection
    alignment: FinetuneOptions | None = Field(
        default=FinetuneOptions(), description="safety alignment before the user fine-tune (cached); null: skip")
    attack: AttackSection = AttackSection()
    data: SafetySizes = SafetySizes()
    pruning: PruningOptions = PruningOptions()
    methods: dict[str, PruningOverrides | None] = Field(min_length=1)
    judge: str = Field(default="default", description="default | phrases | folder of a refusal classifier")
    evaluation: SafetyEvaluation = SafetyEvaluation()

    def method_defaults(self, spec: MethodSpec) -> dict[str, Any]:
        return self.pruning.model_dump()

    def result_names(self) -> set[str]:
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
    data: AuthorsSection | CapitalsSection = Field(discriminator="protocol")
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


def load_scenario(path: str | Path) -> ScenarioCore:
    path = Path(path)
    if path.is_dir():
        raise SafeEditError(f"{path} is a folder; give a scenario YAML file, e.g. one in scenarios/")
    if not path.is_file():
        raise SafeEditError(f"{path}: no such scenario file; see scenarios/ for ready-made ones")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SafeEditError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SafeEditError(f"{path}: a scenario is a YAML mapping with keys name, request, model, data, ...")
    kind = raw.get("kind", "classification")
    if kind not in KINDS:
        raise SafeEditError(f"{path}: kind: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    try:
        scenario = KINDS[kind](**raw)
    except pydantic.ValidationError as error:
        raise SafeEditError(f"{path}: {first_problem(error)}") from None
    scenario.method_options()
    try:
        check_names(scenario.criteria, scenario.result_names())
    except SafeEditError as error:
        raise SafeEditError(f"{path}: {error}") from None
    return scenario
