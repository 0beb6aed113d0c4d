"""From a score name to a mask: the one path every method that confines its edit to top-scoring weights takes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from safeedit.attribution.registry import get_score
from safeedit.attribution.stream import compute_scores
from safeedit.masks import Mask, Scope


def score_mask(model: nn.Module, score: str, data: Mapping[str, Iterable], ratio: float, scope: Scope = "global",
               options: Mapping[str, Any] | None = None, include: str | Sequence[str] | None = None,
               exclude: str | Sequence[str] | None = None, progress: bool = True) -> Mask:
    """The top-`ratio` weights by `score`, reading only the data roles the score needs (others in `data` are
    ignored, so callers can offer forget and retain data to any score)."""
    spec = get_score(score)
    scores = compute_scores(model, spec.name, {role: data[role] for role in spec.roles}, include=include,
                            exclude=exclude, options=options, progress=progress)
    return Mask.top_k(scores, ratio, scope, {"score": spec.name})
