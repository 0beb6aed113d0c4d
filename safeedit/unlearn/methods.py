"""The classifier unlearning methods a scenario can name, each one registered function (`safeedit.methods`).

Every method gets the same task (the original model, forget and retain data, a loader factory) and returns an
`EditResult`: the edited model and, where it used one, its mask. `retrain` (on the retain set, from scratch or from
the model's base checkpoint, with the recorded recipe) is the reference the approximate methods are measured against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import DataLoader

from safeedit.attribution.select import score_mask
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.methods import EditResult, check_mask_score, register_method
from safeedit.models.training import train_classifier
from safeedit.unlearn.loop import TrainingOptions, unlearn
from safeedit.unlearn.objectives import OBJECTIVES, Loaders
from safeedit.unlearn.salun import SalUnOptions, salun


@dataclass
class UnlearnTask:
    model: nn.Module  # the original, trained on forget ∪ retain
    forget: Dataset
    retain: Dataset
    num_classes: int
    loader: Callable[[Dataset, int, bool, int], DataLoader]  # (data, batch size, shuffle, seed)
    build_fresh: Callable[[], nn.Module]  # where the reference starts: a new model of the same architecture
    # (randomly initialised, or with a base checkpoint's body: safeedit.unlearn.reference)
    seed: int = 0
    progress: bool = True

    def loaders(self, batch_size: int) -> Loaders:
        return Loaders(
            self.loader(self.forget, batch_size, True, self.seed),
            self.loader(self.retain, batch_size, True, self.seed + 1),
            self.num_classes,
        )


class ObjectiveOptions(TrainingOptions):
    mask_score: str | None = Field(default=None, description="restrict the edit to a mask from this score")
    ratio: float = Field(default=0.5, gt=0, le=1, validation_alias=AliasChoices("ratio", "mask_ratio"),
                         description="share of weights the mask keeps (`mask_ratio` is the old name)")

    _known_score = field_validator("mask_score")(check_mask_score)


class L1SparseOptions(ObjectiveOptions):
    alpha: float = Field(default=5e-4, ge=0, description="initial l1 weight, decayed linearly to 0")


class RetrainOptions(BaseModel):
    """Training the reference on the retain set; defaults come from the original model's recipe."""

    model_config = ConfigDict(extra="forbid")
    epochs: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    seed_offset: int = Field(default=1000, description="retrain initialisation seed = scenario seed + offset")


def _objective(name: str, task: UnlearnTask, options: ObjectiveOptions, seed: int, progress: bool) -> EditResult:
    """Run objective `name` on the task, confined to a mask from `options.mask_score` when one is named."""
    loaders = task.loaders(options.batch_size)
    mask = _mask_from(task, loaders, options, progress) if options.mask_score else None
    extra = {"alpha": options.alpha} if isinstance(options, L1SparseOptions) else {}
    objective = OBJECTIVES[name](loaders, options.epochs, seed, **extra)
    model = unlearn(task.model, objective, options, mask, progress, name)
    return EditResult(model, masks={"mask": mask} if mask is not None else {})


def _mask_from(task: UnlearnTask, loaders: Loaders, options: ObjectiveOptions, progress: bool) -> Mask:
    data = {"forget": loaders.forget, "retain": loaders.retain, "data": loaders.forget, "calibration": loaders.forget}
    return score_mask(task.model, options.mask_score, data, options.ratio, progress=progress)


_APPROXIMATE = (
    "Approximate unlearning: the edited model is not proven identical to one trained without the data; the "
    "evidence is behavioural (accuracies, membership attacks) on the sets evaluated here. "
)


# The baselines SalUn is compared with: one objective each, optionally confined to a mask (`mask_score`).
BASELINES = (  # name, options, summary, what it leaves undone, paper
    ("ft", ObjectiveOptions, "fine-tune on the retain set",
     "Fine-tuning only lets the model drift away from the forget data; it often keeps it.",
     "Warnecke et al., NDSS 2023 (as a SalUn baseline)"),
    ("ga", ObjectiveOptions, "gradient ascent on the forget set",
     "Gradient ascent has no stopping point: too far and the model breaks on everything else.",
     "Thudi et al., EuroS&P 2022"),
    ("rl", ObjectiveOptions, "random labels on forget, then retain",
     "Random labels change every weight; nothing bounds the edit to what the data influenced.",
     "Golatkar et al., CVPR 2020"),
    ("l1_sparse", L1SparseOptions, "retain fine-tune with decaying l1",
     "Sparsity makes forgetting by fine-tuning easier but does not target the forget data.",
     "Jia et al., NeurIPS 2023"),
)


def _baseline(name: str, options_type: type[ObjectiveOptions]) -> Callable[..., EditResult]:
    """The registered function of baseline `name`: its objective, with `options_type` as its configuration."""
    def method(task: UnlearnTask, options: ObjectiveOptions, seed: int, progress: bool) -> EditResult:
        return _objective(name, task, options, seed, progress)
    method.__name__ = name
    method.__annotations__["options"] = options_type
    return method


for _name, _options, _summary, _caveat, _paper in BASELINES:
    register_method("classification", summary=_summary, limitations=_APPROXIMATE + _caveat, paper=_paper,
                    name=_name)(_baseline(_name, _options))


@register_method("classification", summary="saliency mask + random labels (Fan et al. 2024)",
                 limitations=_APPROXIMATE + "Only the weights with the largest forget-loss gradient are edited; the "
                 "rest stay bit-identical. The mask ratio and learning rate were tuned on other seeds; a different "
                 "model or request may need them re-tuned.", paper="Fan et al., ICLR 2024", name="salun")
def salun_method(task: UnlearnTask, options: SalUnOptions, seed: int, progress: bool) -> EditResult:
    loaders = task.loaders(options.batch_size)
    model, mask = salun(task.model, loaders.forget, loaders.retain, task.num_classes, options, seed, progress)
    return EditResult(model, masks={"mask": mask})


def retrain(task: UnlearnTask, options: RetrainOptions, recipe: dict) -> EditResult:
    """A model trained on the retain set only, from `task.build_fresh()` (a seeded random initialisation, or a base
    checkpoint's body with a seeded head): what exact unlearning would produce."""
    epochs = options.epochs or recipe.get("epochs")
    lr = options.lr or recipe.get("lr")
    batch_size = options.batch_size or recipe.get("batch_size", 64)
    if epochs is None or lr is None:
        raise SafeEditError("retrain needs a recipe: set retrain.epochs and retrain.lr in the scenario")
    seed = task.seed + options.seed_offset
    torch.manual_seed(seed)
    model = task.build_fresh().to(next(task.model.parameters()).device)
    loader = task.loader(task.retain, batch_size, True, seed)
    train_classifier(model, loader, epochs, lr, options.weight_decay, task.progress, "retrain")
    return EditResult(model)
