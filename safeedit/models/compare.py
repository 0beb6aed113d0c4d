"""Is one model the other's starting point? Parameter names and shapes compared, from the safetensors headers of
model folders before anything loads, and again on the loaded models (which covers hub ids too).

Used where a method reads a fine-tune's update W − W_before (Antidote's `target: update`): a "base" of another
architecture would otherwise fail deep inside the pruning with a shape error, or not at all where shapes happen to
agree but names do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open
from torch import nn

from safeedit.errors import SafeEditError

Shapes = Mapping[str, tuple[int, ...]]


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file, from its header only (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())  # a safe_open handle is not iterable
        return {name: tuple(handle.get_slice(name).get_shape()) for name in names}


def folder_shapes(spec: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape over every safetensors file of a local model folder, read from the headers only (no
    tensor is loaded); None when `spec` is not such a folder (an embedded name, a hub id, an adapter folder) or a
    header does not parse (the loader then says what is wrong with the file)."""
    folder = Path(spec)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or (folder / "adapter_config.json").exists():
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for path in files:
            shapes.update(safetensors_shapes(path))
    except Exception:  # safetensors raises several types for a bad header; the loader reports it in one line
        return None
    return shapes


def first_difference(ours: Shapes, theirs: Shapes) -> tuple[str, tuple[int, ...] | None, tuple[int, ...] | None] | None:
    """The first tensor (ours in order, then theirs sorted) missing from one side or shaped differently, as
    (name, our shape or None, their shape or None); None when both have the same names and shapes."""
    for name, shape in ours.items():
        if name not in theirs or tuple(theirs[name]) != tuple(shape):
            return name, tuple(shape), tuple(theirs[name]) if name in theirs else None
    extra = sorted(set(theirs) - set(ours))
    return (extra[0], None, tuple(theirs[extra[0]])) if extra else None


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_same_shapes(model: Shapes, base: Shapes, model_name: str, base_name: str, field: str = "base") -> None:
    """Raise a one-line error naming the first parameter that is missing from one of the two, or whose shape
    differs: `base` must be the model the fine-tune `model` started from."""
    difference = first_difference(model, base)
    if difference is None:
        return
    fix = f"{field} must be the model {model_name} was fine-tuned from (the same architecture)"
    name, in_model, in_base = difference
    if in_base is None:
        raise SafeEditError(f"{field}: {base_name} has no parameter {name!r} of the fine-tuned model; {fix}")
    if in_model is None:
        raise SafeEditError(f"{field}: {base_name} has a parameter {name!r} the fine-tuned model lacks; {fix}")
    raise SafeEditError(f"{field}: parameter {name!r} is {in_base} in {base_name} but {in_model} in the fine-tuned "
                        f"model; {fix}")
