"""Putting weights into a model: strict (no silently random weights) and checked for NaN."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from safeedit.errors import SafeEditError


def load_state_dict_strict(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model`, refusing missing, unexpected or wrongly shaped entries."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise SafeEditError(
            f"{source}: weights do not fit {type(model).__name__} ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, first {first!r}); they belong to another architecture"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SafeEditError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; the weights belong to another architecture"
            )
    model.load_state_dict(dict(tensors), strict=True)
    check_finite(model, source)


def check_finite(model: nn.Module | Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite values in a model's state or in a name -> tensor mapping."""
    tensors = model.state_dict() if isinstance(model, nn.Module) else model
    for name, tensor in tensors.items():
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
            raise SafeEditError(f"{source}: tensor {name!r} holds NaN or infinite values; the checkpoint is corrupt")


def check_same_architecture(model: nn.Module, other: nn.Module, source: str) -> None:
    """Refuse `other` (named `source`) unless it has `model`'s parameter names and shapes: a reference or a
    comparison model must be the same network, not only the same kind."""
    from safeedit.models.compare import first_difference

    mine = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    theirs = {name: tuple(p.shape) for name, p in other.state_dict().items()}
    difference = first_difference(mine, theirs)
    if difference is not None:
        name, in_model, in_other = difference
        raise SafeEditError(f"{source}: tensor {name!r} is {in_other or 'missing'} there but {in_model or 'missing'} "
                            "in the model; it belongs to another architecture: give a model fine-tuned from the same "
                            "base")
