"""The merging methods a scenario can name: each a registered function of the method contract (`safeedit.methods`)
taking the `MergeSetting`, its options, the seed and whether to show progress, and returning the merged parameters,
its masks and details as an `EditResult`.

`individual` is the reference row: every task model on its own task, no merge. DARE lives in `safeedit.merge.dare`
and registers with the rest (imported at the end of this module).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from safeedit.config import Strict
from safeedit.merge.adamerging import AdaMergingOptions
from safeedit.merge.adamerging import adamerging as learn_adamerging
from safeedit.merge.baselines import task_arithmetic as add_task_vectors
from safeedit.merge.baselines import ties as ties_merge
from safeedit.merge.concrete import GateOptions, concrete_task_arithmetic
from safeedit.merge.dam import DAMOptions
from safeedit.merge.dam import dam as learn_dam
from safeedit.merge.setting import MergeSetting
from safeedit.methods import EditResult, register_method

# The merges that learn from unlabeled task data (the rest need only the base model and the task vectors).
LEARNED = ("adamerging", "concrete_ta", "dam")


class IndividualOptions(Strict):
    pass


class TaskArithmeticOptions(Strict):
    scale: float = Field(default=0.3, ge=0, description="λ in θ₀ + λ Σ wᵢ τᵢ (wᵢ: each task model's weight, 1 "
                         "unless given)")
    normalize: bool = Field(default=False, description="divide Σ wᵢ τᵢ by Σ wᵢ (mergekit's normalize)")


class TiesOptions(Strict):
    keep: float = Field(default=0.2, gt=0, le=1, description="share of each task vector kept by magnitude")
    scale: float = Field(default=1.0, ge=0, description="λ applied to the disjoint mean")
    trim: Literal["tensor", "global"] = Field(
        default="tensor", description="tensor: mergekit's TIES (per tensor int(keep·n), at least 1; a zero sum "
        "elects +); global: one threshold over the whole vector, round-half-up, a zero sum elects nothing "
        "(FusionBench's trim; the merge-backdoor scenarios use it)")
    normalize: bool = Field(default=True, description="divide the agreeing weighted values by the sum of their "
                            "weights (mergekit's ties default; with weights 1, the disjoint mean)")


# What no merge's evidence shows; each method adds what its own construction leaves open.
_MEASURED = ("Measured on the embedded tasks and triggers of this scenario; other triggers, poison rates or adaptive "
             "attackers are not covered. ")


@register_method("merge", summary="each task model on its own task (no merge): the accuracy a merge would like to keep",
                 limitations=_MEASURED + "Reference only, not a merge: it keeps one model per task, and the "
                 "backdoored task model keeps its backdoor.",
                 paper="Ilharco et al., ICLR 2023 (the per-task reference of merging papers)")
def individual(setting: MergeSetting, options: IndividualOptions, seed: int, progress: bool) -> EditResult:
    return EditResult()


@register_method("merge", summary="task arithmetic: θ₀ + λ Σ τᵢ",
                 limitations=_MEASURED + "A data-free sum of task vectors with a fixed λ: nothing in it looks for a "
                 "backdoor, so a backdoored task vector is merged like any other.",
                 paper="Ilharco et al., ICLR 2023")
def task_arithmetic(setting: MergeSetting, options: TaskArithmeticOptions, seed: int, progress: bool) -> EditResult:
    return EditResult(parameters=add_task_vectors(setting.base, setting.vectors, options.scale, setting.weights,
                                                  options.normalize))


@register_method("merge", summary="TIES: trim each task vector, elect signs, disjoint mean",
                 limitations=_MEASURED + "Trimming by magnitude and electing signs reduce interference between tasks, "
                 "not backdoors: a backdoor carried by large weights survives the trim.",
                 paper="Yadav et al., NeurIPS 2023")
def ties(setting: MergeSetting, options: TiesOptions, seed: int, progress: bool) -> EditResult:
    return EditResult(parameters=ties_merge(setting.base, setting.vectors, setting.densities_or(options.keep),
                                            options.scale, options.trim, setting.weights, options.normalize))


@register_method("merge", summary="AdaMerging: merge coefficients learned by entropy minimization on unlabeled task "
                 "data", limitations=_MEASURED + "The coefficients are learned to make confident predictions on "
                 "unlabeled data; nothing penalises a backdoor, which a confident merge can keep.",
                 paper="Yang et al., ICLR 2024")
def adamerging(setting: MergeSetting, options: AdaMergingOptions, seed: int, progress: bool) -> EditResult:
    parameters, coefficients = learn_adamerging(setting, options, progress)
    summary = coefficients if coefficients.dim() == 1 else coefficients.mean(dim=1)
    return EditResult(parameters=parameters,
                      details={"coefficients_mean": dict(zip(setting.tasks, summary.tolist(), strict=True))})


@register_method("merge", summary="Concrete task arithmetic: one shared mask over task vectors learned on unlabeled "
                 "task data", limitations=_MEASURED + "The shared mask is learned for confident predictions on "
                 "unlabeled data, not against backdoors; whatever of a backdoor it drops, it drops by chance.",
                 paper="Tang et al., 2023 (Concrete subspace learning)")
def concrete_ta(setting: MergeSetting, options: GateOptions, seed: int, progress: bool) -> EditResult:
    parameters, mask = concrete_task_arithmetic(setting, options, seed, progress)
    return EditResult(parameters=parameters, masks={"concrete_ta": mask})


@register_method("merge", summary="DAM: task-shared mask and backdoor-detection mask (inverted triggers), learned on "
                 "unlabeled task data", limitations=_MEASURED + "The backdoor mask is learned against triggers "
                 "inverted on unlabeled data; a trigger the inversion does not find (another shape, size or place) "
                 "can survive the merge.", paper="Yang et al., ICLR 2025")
def dam(setting: MergeSetting, options: DAMOptions, seed: int, progress: bool) -> EditResult:
    result = learn_dam(setting, options, seed, progress)
    return EditResult(parameters=result.parameters,
                      masks={"dam-shared": result.shared_mask, "dam-backdoor": result.backdoor_mask},
                      details={"coefficients": dict(zip(setting.tasks, result.coefficients.tolist(), strict=True))})


