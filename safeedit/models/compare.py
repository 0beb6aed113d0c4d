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
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())  # a safe_open handle is not iterable
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names})
    except Exception:  # safetensors raises several types for a bad header; the loader reports it in one line
        return None
    return shapes


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_same_shapes(model: Shapes, base: Shapes, model_name: str, base_name: str, field: str = "base") -> None:
    """Raise a one-line error naming the first parameter that is missing from one of the two, or whose shape
    differs: `base` must be the model the fine-tune `model` started from."""
    fix = f"{field} must be the model {model_name} was fine-tuned from (the same architecture)"
    for name, shape in model.items():
        if name not in base:
            raise SafeEditError(f"{field}: {base_name} has no parameter {name!r} of the fine-tuned model; {fix}")
        if tuple(base[name]) != tuple(shape):
            raise SafeEditError(f"{field}: parameter {name!r} is {tuple(base[name])} in {base_name} but "
                                f"{tuple(shape)} in the fine-tuned model; {fix}")
    extra = [name for name in base if name not in model]
    if extra:
        raise SafeEditError(f"{field}: {base_name} has a parameter {extra[0]!r} the fine-tuned model lacks; {fix}")
