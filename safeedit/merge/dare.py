"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): drop and rescale each task vector, then merge
the sparse vectors by task arithmetic.

For each task vector τᵢ and each of its tensors, every entry is kept independently with probability `density` and
the kept entries are divided by `density` (τ̃ᵢ = mᵢ ⊙ τᵢ / p, mᵢ ~ Bernoulli(p)), so E[τ̃ᵢ] = τᵢ; then
θ = θ₀ + λ Σᵢ τ̃ᵢ. The masks are drawn on the CPU from a `torch.Generator` seeded with `seed + i` for the i-th task,
tensor by tensor in the vector's order, so a seed gives the same merge on any device.

Defaults: mergekit's `dare_linear` offers none to copy: its `density` defaults to 1.0 (nothing dropped, i.e. plain
task arithmetic) and each model's `weight` is required (times a `lambda` of 1.0, not normalised). So density is 0.5,
a common choice in published `dare_linear` recipes and a mild drop next to the paper's (90% and more of an SFT
delta), and λ is 0.3, this package's task arithmetic default: `dare` at density 1.0 is exactly `task_arithmetic`
with its defaults, and the two rows of a scenario differ by the drop alone.

mergekit's `dare_linear` and `dare_ties` (`safeedit merge --config`) draw the same Bernoulli mask but, with their
default `rescale: true`, rescale each kept tensor so that its L1 norm equals the tensor's before the drop
(`mergekit/sparsify.py` `rescaled_masked_tensor`, norm l1, eps 1e-7: a norm below it leaves the tensor as
dropped), not by 1/density: `rescale: l1` here; `rescale: none` is their `rescale: false`. `sign_election` is
`dare_ties`: TIES's sign election and disjoint mean over the dropped vectors (`baselines.sign_consensus`). Per-model
weights and densities come from the setting (`MergeSetting.weights`, `densities`). mergekit draws from torch's
global generator, so the same recipe drops other entries there: the definition matches, a draw does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from safeedit.merge.baselines import Densities, density_of, sign_consensus, task_arithmetic
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import Vector, merged_parameters
from safeedit.methods import EditResult, register_method

Rescale = Literal["density", "l1", "none"]
L1_EPSILON = 1e-7  # mergekit's `rescaled_masked_tensor` eps


class DareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    density: float = Field(default=0.5, gt=0, le=1, description="share of each task vector's entries kept (p)")
    scale: float = Field(default=0.3, ge=0, description="λ in θ₀ + λ Σ τ̃ᵢ")
    rescale: Rescale = Field(default="density", description="kept entries divided by density (the paper's), or "
                             "each tensor scaled back to its L1 norm (l1, mergekit's dare_*), or left as kept (none)")
    sign_election: bool = Field(default=False, description="TIES's sign election and disjoint mean over the dropped "
                                "vectors (mergekit's dare_ties)")
    normalize: bool = Field(default=False, description="divide by the sum of the weights (with sign_election: of "
                            "the agreeing models)")


def dare_vectors(vectors: Mapping[str, Vector], density: Densities, seed: int, rescale: Rescale = "density",
                 generators: dict[str, torch.Generator] | None = None) -> dict[str, Vector]:
    """Every task vector with each entry kept with probability `density` (per task where it maps tasks), the kept
    entries rescaled by 1/density (`density`), back to the tensor's L1 norm (`l1`) or not at all (`none`).

    `generators` (task -> generator, filled here on first use) carries the draws over from one call to the next:
    a merge streamed tensor by tensor (`safeedit.merge.streaming`) calls this once per tensor, in the vector's
    order, and draws exactly what one call over whole vectors draws."""
    generators = {} if generators is None else generators
    sparse = {}
    for index, (task, vector) in enumerate(vectors.items()):
        p = density_of(density, task)
        if not 0 < p <= 1:
            raise ValueError(f"density must be in (0, 1], got {p}")
        generator = generators.setdefault(task, torch.Generator().manual_seed(seed + index))
        sparse[task] = {}
        for name, tensor in vector.items():
            keep = (torch.rand(tensor.shape, generator=generator) < p).to(tensor.device)
            if rescale == "density":
                sparse[task][name] = torch.where(keep, tensor / p, torch.zeros_like(tensor))
            else:
                kept = torch.where(keep, tensor, torch.zeros_like(tensor))
                sparse[task][name] = l1_rescaled(tensor, kept) if rescale == "l1" else kept
    return sparse


def l1_rescaled(tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` scaled so that its L1 norm is `tensor`'s, unless either norm is below mergekit's eps."""
    before, after = tensor.abs().sum(), kept.abs().sum()
    if before < L1_EPSILON or after < L1_EPSILON:
        return kept
    return kept * (before / after)


@register_method("merge", summary="DARE: drop each task vector's entries at random, rescale the rest, then task "
                 "arithmetic", limitations="Measured on the embedded tasks and triggers of this scenario; other "
                 "triggers, poison rates or adaptive attackers are not covered. Entries are dropped at random, blind "
                 "to any backdoor: in expectation the merge is task arithmetic, backdoor included, and one seed is "
                 "one draw.", paper="Yu et al., ICML 2024")
def dare(setting: MergeSetting, options: DareOptions, seed: int, progress: bool) -> EditResult:
    return EditResult(parameters=dare_merge(setting, options, seed))


def dare_merge(setting: MergeSetting, options: DareOptions, seed: int,
               generators: dict[str, torch.Generator] | None = None) -> Vector:
    """DARE's merged parameters (`generators`: see `dare_vectors`)."""
    sparse = dare_vectors(setting.vectors, setting.densities_or(options.density), seed, options.rescale, generators)
    if options.sign_election:
        merged = sign_consensus(sparse, setting.weights, options.normalize)
        return merged_parameters(setting.base, {"dare": merged}, {"dare": options.scale})
    return task_arithmetic(setting.base, sparse, options.scale, setting.weights, options.normalize)
