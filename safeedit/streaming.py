"""Scores and global top-k masks of a safetensors checkpoint larger than memory, read one tensor at a time.

Only scores that read the weights alone stream this way (`magnitude`, `random`: registered scores with no data
statistic); scores that need gradients or activations need the model. Each score tensor is computed from its
weight tensor when a pass asks for it (`masks.StreamedSelection` makes three passes), and the mask is written as a
packed mask file tensor by tensor (`masks.save_streamed`), so the peak memory is a few tensors, not the model. The
mask is exactly `Mask.top_k` of the in-memory scores (same selection, same tie rule: name, then flat index).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from safeedit.attribution import get_score
from safeedit.attribution.params import select_parameters
from safeedit.checkpoint import Checkpoint
from safeedit.errors import SafeEditError
from safeedit.masks import Rounding, StreamedSelection, save_streamed, selection_metadata


def checkpoint_tensors(checkpoint: Checkpoint, include: str | Sequence[str] | None = None,
                       exclude: str | Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating-point tensors of `checkpoint` chosen by `include`/`exclude` patterns (as
    `select_parameters` chooses a model's parameters), from the headers alone."""
    stand_in = SimpleNamespace(named_parameters=lambda: (
        (name, torch.empty(entry.shape, dtype=entry.dtype, device="meta"))
        for name, entry in checkpoint.entries.items()))
    return {name: tuple(t.shape) for name, t in select_parameters(stand_in, include, exclude).items()}


def checkpoint_mask(path: str | os.PathLike, out: str | os.PathLike, ratio: float, score: str = "magnitude",
                    include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                    options: Mapping[str, Any] | None = None, rounding: Rounding = "half_up") -> dict[str, int]:
    """Write the global top-`ratio` mask of `score` over the chosen tensors of checkpoint `path` to `out` (a packed
    mask file), reading one tensor at a time. Returns the selected and total counts."""
    spec = get_score(score)
    if spec.statistics:
        raise SafeEditError(f"score {score!r} needs data ({', '.join(spec.roles)}), so it cannot be computed from a "
                            "checkpoint tensor by tensor; stream magnitude or random, or load the model")
    score_options = spec.validate_options(options)
    checkpoint = Checkpoint(path)
    shapes = checkpoint_tensors(checkpoint, include, exclude)

    def read(name: str) -> torch.Tensor:
        return spec.function({name: checkpoint.tensor(name)}, **score_options)[name]

    selection = StreamedSelection(shapes, read, ratio, rounding)  # the threshold: the passes before the mask's
    metadata = {**selection_metadata(ratio, "global", rounding), "score": score, "selected": str(selection.k),
                "total": str(selection.total)}
    save_streamed(out, shapes, ((name, selection.mask(name)) for name in sorted(shapes)), metadata)
    return {"selected": selection.k, "total": selection.total}
