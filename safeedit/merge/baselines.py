"""Merging baselines that need no data: task arithmetic and TIES.

- Task arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ Σᵢ τᵢ, λ = 0.3.
- TIES (Yadav et al., NeurIPS 2023): trim each τᵢ to its top-k% entries by magnitude (one threshold over the
  whole vector, `Mask.top_k` with global scope), elect a sign per entry (sign of the sum of trimmed values), average
  the trimmed values that agree with the elected sign (disjoint mean), then θ = θ₀ + λ τ_ties.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safeedit.masks import Mask
from safeedit.merge.vectors import Vector, merged_parameters


def task_arithmetic(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Vector], scale: float = 0.3) -> Vector:
    return merged_parameters(base, vectors, {task: scale for task in vectors})


def trimmed(vector: Vector, keep: float) -> Vector:
    """τ with all but its top `keep` share of entries (by |τ|, over the whole vector) set to zero."""
    keep_mask = Mask.top_k({name: t.abs() for name, t in vector.items()}, keep, scope="global")
    return {name: t * keep_mask.tensors[name].to(t.dtype) for name, t in vector.items()}


def ties_vector(vectors: Mapping[str, Vector], keep: float = 0.2) -> Vector:
    """The TIES merged task vector: trim, elect sign, disjoint mean."""
    kept = [trimmed(vector, keep) for vector in vectors.values()]
    merged = {}
    for name in kept[0]:
        stacked = torch.stack([vector[name] for vector in kept])
        elected = torch.sign(stacked.sum(dim=0))
        agrees = (torch.sign(stacked) == elected) & (stacked != 0)
        count = agrees.sum(dim=0).clamp(min=1)
        merged[name] = (stacked * agrees).sum(dim=0) / count
    return merged


def ties(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Vector], keep: float = 0.2,
         scale: float = 1.0) -> Vector:
    return merged_parameters(base, {"ties": ties_vector(vectors, keep)}, {"ties": scale})
