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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from safeedit.merge.baselines import task_arithmetic
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import Vector
from safeedit.methods import EditResult, register_method


class DareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    density: float = Field(default=0.5, gt=0, le=1, description="share of each task vector's entries kept (p)")
    scale: float = Field(default=0.3, ge=0, description="λ in θ₀ + λ Σ τ̃ᵢ")


def dare_vectors(vectors: Mapping[str, Vector], density: float, seed: int) -> dict[str, Vector]:
    """Every task vector with each entry kept with probability `density` and rescaled by 1/density (the rest 0)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sparse = {}
    for index, (task, vector) in enumerate(vectors.items()):
        generator = torch.Generator().manual_seed(seed + index)
        sparse[task] = {}
        for name, tensor in vector.items():
            keep = (torch.rand(tensor.shape, generator=generator) < density).to(tensor.device)
            sparse[task][name] = torch.where(keep, tensor / density, torch.zeros_like(tensor))
    return sparse


@register_method("merge", summary="DARE: drop each task vector's entries at random, rescale the rest, then task "
                 "arithmetic", limitations="Measured on the embedded tasks and triggers of this scenario; other "
                 "triggers, poison rates or adaptive attackers are not covered. Entries are dropped at random, blind "
                 "to any backdoor: in expectation the merge is task arithmetic, backdoor included, and one seed is "
                 "one draw.", paper="Yu et al., ICML 2024")
def dare(setting: MergeSetting, options: DareOptions, seed: int, progress: bool) -> EditResult:
    sparse = dare_vectors(setting.vectors, options.density, seed)
    return EditResult(parameters=task_arithmetic(setting.base, sparse, options.scale))
