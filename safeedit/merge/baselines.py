"""Merging baselines that need no data: task arithmetic and TIES.

- Task arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ Σᵢ τᵢ, λ = 0.3.
- TIES (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging Models"): trim each τᵢ to
  its top-k% entries by magnitude, elect a sign per entry, average the trimmed values that agree with the elected
  sign (disjoint mean), then θ = θ₀ + λ τ_ties. The paper leaves the trim's unit, its rounding and a zero-sum sign
  open; two conventions are in use and both are here (`trim`):

  `tensor` (the default): mergekit's, `mergekit/sparsify.py` `magnitude` and
  `mergekit/merge_methods/generalized_task_arithmetic.py` (`get_mask` with method "sum", the task's `execute`, the
  "ties" entry of `merge_methods/registry.py`: normalize on, no rescale). Each tensor of each τᵢ keeps its
  k = int(density · n) largest |δ| (`Mask.top_k`, scope `tensor`, rounding `floor`; where mergekit asserts k > 0 we
  keep max(1, k), so a tiny tensor keeps its largest entry; mergekit's argsort breaks ties in |δ| in no stated
  order, ours gives them to the lower flat index). The elected sign is +1 where the sum of the trimmed values is
  ≥ 0 (a zero sum elects +) and −1 elsewhere; an entry is kept where its sign equals the elected sign (a zero entry
  has sign 0 and is never kept); the merged value is the sum of the kept values over their count (mergekit's
  weights all 1; a count of 0 divides by 1).

  `global`: one threshold over the whole task vector (`Mask.top_k`, scope `global`, round-half-up count), the trim
  FusionBench's TIES uses; the elected sign is sign(sum), so a zero sum elects nothing. This is the function this
  module had before the per-tensor default, kept bit-identical: the merge-backdoor scenarios (and the DAM
  comparison in benchmarks/) name it.

Per-model weights and densities (mergekit's `weight` and `density`, `safeedit merge --config`, `kind: merge`):
task arithmetic is θ₀ + λ Σᵢ wᵢ τᵢ, divided by Σᵢ wᵢ with `normalize` (mergekit's `GTATask.execute` without a
consensus method; a sum under 1e-8 divides by 1). TIES trims each τᵢ to its own density, elects the sign of
Σᵢ wᵢ τ̃ᵢ and sums the agreeing wᵢ τ̃ᵢ; with `normalize` (TIES's default) that sum is divided by the sum of the
weights of the agreeing models (mergekit's `(weights * mask).sum(dim=0)`, 0 counted as 1); λ scales the result.
With no weights given every wᵢ is 1 and the functions compute exactly what they did before weights existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.merge.vectors import Vector, merged_parameters

Trim = Literal["tensor", "global"]


Weights = Mapping[str, float]
Densities = float | Mapping[str, float]


def task_arithmetic_coefficients(tasks: Sequence[str], scale: float = 0.3, weights: Weights | None = None,
                                 normalize: bool = False) -> dict[str, float]:
    """Each task vector's coefficient in task arithmetic: λ wᵢ, divided by Σᵢ wᵢ with `normalize` (a sum under
    1e-8 divides by 1)."""
    weights = {task: (weights or {}).get(task, 1.0) for task in tasks}
    divisor = sum(weights.values()) if normalize else 1.0
    divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    return {task: scale * weight / divisor for task, weight in weights.items()}


def task_arithmetic(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Vector], scale: float = 0.3,
                    weights: Weights | None = None, normalize: bool = False) -> Vector:
    """θ₀ + λ Σᵢ wᵢ τᵢ (each wᵢ 1 unless `weights` names it), the sum divided by Σᵢ wᵢ with `normalize`."""
    return merged_parameters(base, vectors, task_arithmetic_coefficients(list(vectors), scale, weights, normalize))


def trimmed(vector: Vector, keep: float, trim: Trim = "tensor") -> Vector:
    """τ with all but its top `keep` share of entries by |τ| set to zero: per tensor, max(1, int(keep · n)) each
    (`tensor`, mergekit's `magnitude`), or round-half-up(keep · N) over the whole vector (`global`)."""
    if trim not in ("tensor", "global"):
        raise SafeEditError(f"unknown TIES trim {trim!r}; choose tensor (mergekit's, per tensor) or global")
    magnitudes = {name: t.abs() for name, t in vector.items()}
    if trim == "tensor":
        keep_mask = Mask.top_k(magnitudes, keep, scope="tensor", rounding="floor")
    else:
        keep_mask = Mask.top_k(magnitudes, keep, scope="global")
    return {name: t * keep_mask.tensors[name].to(t.dtype) for name, t in vector.items()}


def density_of(densities: Densities, task: str) -> float:
    """The density of `task`: its own where `densities` maps tasks, else the one number given."""
    return densities[task] if isinstance(densities, Mapping) else densities


def sign_consensus(vectors: Mapping[str, Vector], weights: Weights | None = None, normalize: bool = True,
                   zero_sum: Literal["positive", "none"] = "positive") -> Vector:
    """TIES's election and disjoint mean over (already sparse) task vectors: per entry, the sign of Σᵢ wᵢ τᵢ is
    elected (`positive`: a zero sum elects +1, mergekit's `get_mask("sum")`; `none`: sign(sum), a zero sum elects
    nothing), and the agreeing wᵢ τᵢ are summed, divided (with `normalize`) by the sum of the agreeing wᵢ (by their
    count without weights), a zero divisor counting as 1. A zero entry has sign 0 and never agrees."""
    tasks = list(vectors)
    merged = {}
    for name in vectors[tasks[0]]:
        stacked = torch.stack([vectors[task][name] for task in tasks])
        if weights is not None:
            factors = torch.tensor([weights.get(task, 1.0) for task in tasks], dtype=stacked.dtype,
                                   device=stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
            stacked = stacked * factors
        if zero_sum == "positive":  # mergekit get_mask("sum"): sum ≥ 0 elects +1; sign 0 never matches
            elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
            agrees = torch.sign(stacked) == elected
        else:  # sign(sum): a zero sum elects 0, and nothing agrees with it
            elected = torch.sign(stacked.sum(dim=0))
            agrees = (torch.sign(stacked) == elected) & (stacked != 0)
        mixed = (stacked * agrees).sum(dim=0)
        if not normalize:
            merged[name] = mixed
        elif weights is None:
            merged[name] = mixed / agrees.sum(dim=0, dtype=mixed.dtype).clamp(min=1)  # exact small counts
        else:
            divisor = (factors * agrees).sum(dim=0)
            merged[name] = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged


def ties_vector(vectors: Mapping[str, Vector], keep: Densities = 0.2, trim: Trim = "tensor",
                weights: Weights | None = None, normalize: bool = True) -> Vector:
    """The TIES merged task vector: trim (each task to its own density where `keep` maps tasks), elect sign,
    disjoint mean (the conventions of `trim`: module docstring)."""
    kept = {task: trimmed(vector, density_of(keep, task), trim) for task, vector in vectors.items()}
    return elect(kept, trim, weights, normalize)


def elect(kept: Mapping[str, Vector], trim: Trim = "tensor", weights: Weights | None = None, normalize: bool = True
          ) -> Vector:
    """TIES after the trim: sign election and disjoint mean with the zero-sum rule of `trim`'s convention."""
    return sign_consensus(kept, weights, normalize, "positive" if trim == "tensor" else "none")


def ties(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Vector], keep: Densities = 0.2,
         scale: float = 1.0, trim: Trim = "tensor", weights: Weights | None = None, normalize: bool = True) -> Vector:
    return merged_parameters(base, {"ties": ties_vector(vectors, keep, trim, weights, normalize)}, {"ties": scale})
