"""The merging methods a scenario can name, with their options, behind one call: `merge(name, options, setting)`.

`individual` is the reference row: every task model on its own task, no merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from safeedit.masks import Mask
from safeedit.merge.adamerging import AdaMergingOptions, adamerging
from safeedit.merge.baselines import task_arithmetic, ties
from safeedit.merge.concrete import GateOptions, concrete_task_arithmetic
from safeedit.merge.dam import DAMOptions, dam
from safeedit.merge.setting import MergeSetting


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IndividualOptions(_Strict):
    pass


class TaskArithmeticOptions(_Strict):
    scale: float = Field(default=0.3, ge=0, description="λ in θ₀ + λ Σ τᵢ")


class TiesOptions(_Strict):
    keep: float = Field(default=0.2, gt=0, le=1, description="share of each task vector kept by magnitude")
    scale: float = Field(default=1.0, ge=0, description="λ applied to the disjoint mean")


MERGE_METHODS: dict[str, type[BaseModel]] = {
    "individual": IndividualOptions, "task_arithmetic": TaskArithmeticOptions, "ties": TiesOptions,
    "adamerging": AdaMergingOptions, "concrete_ta": GateOptions, "dam": DAMOptions,
}
SUMMARIES = {
    "individual": "each task model on its own task (no merge): the accuracy a merge would like to keep",
    "task_arithmetic": "task arithmetic: θ₀ + λ Σ τᵢ",
    "ties": "TIES: trim each task vector, elect signs, disjoint mean",
    "adamerging": "AdaMerging: merge coefficients learned by entropy minimization on unlabeled task data",
    "concrete_ta": "Concrete task arithmetic: one shared mask over task vectors learned on unlabeled task data",
    "dam": "DAM: task-shared mask and backdoor-detection mask (inverted triggers), learned on unlabeled task data",
}


@dataclass
class MergeOutcome:
    parameters: dict[str, torch.Tensor] | None
    masks: dict[str, Mask] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


def merge(name: str, options: BaseModel, setting: MergeSetting, seed: int, progress: bool = True) -> MergeOutcome:
    if name == "individual":
        return MergeOutcome(None)
    if name == "task_arithmetic":
        return MergeOutcome(task_arithmetic(setting.base, setting.vectors, options.scale))
    if name == "ties":
        return MergeOutcome(ties(setting.base, setting.vectors, options.keep, options.scale))
    if name == "adamerging":
        parameters, coefficients = adamerging(setting, options, progress)
        summary = coefficients if coefficients.dim() == 1 else coefficients.mean(dim=1)
        return MergeOutcome(parameters, details={"coefficients_mean": dict(zip(setting.tasks, summary.tolist(),
                                                                              strict=True))})
    if name == "concrete_ta":
        parameters, mask = concrete_task_arithmetic(setting, options, seed, progress)
        return MergeOutcome(parameters, {"concrete_ta": mask})
    if name == "dam":
        result = dam(setting, options, seed, progress)
        return MergeOutcome(result.parameters, {"dam-shared": result.shared_mask, "dam-backdoor": result.backdoor_mask},
                            {"coefficients": dict(zip(setting.tasks, result.coefficients.tolist(), strict=True))})
    raise KeyError(name)
