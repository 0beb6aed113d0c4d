"""Scores and global top-k masks of a safetensors checkpoint larger than memory, read one tensor at a time.

Scores that read the weights alone (`magnitude`, `random`) stream directly. Wanda streams layer by layer: its input
statistics come from forward passes of the model loaded by `accelerate` with every block (decoder layer) offloaded
to disk, so one block's weights are in memory at a time (`offloaded_model`), and its weights again from the
checkpoint one tensor at a time. Scores that need gradients need the model (FSDP2 for large ones). Each score tensor
is computed from its weight tensor when a pass asks for it (`masks.StreamedSelection` makes three passes), and the
mask is written as a packed mask file tensor by tensor (`masks.save_streamed`), so the peak memory is a few tensors,
not the model. The mask is exactly `Mask.top_k` of the in-memory scores (same selection, same tie rule: name, then
flat index).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import unittest.mock
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from safeedit.attribution import get_score
from safeedit.attribution.params import select_parameters
from safeedit.attribution.stream import activation_statistics
from safeedit.checkpoint import Checkpoint, TensorWriter
from safeedit.errors import SafeEditError
from safeedit.io import atomic_path
from safeedit.masks import Rounding, StreamedSelection, save_streamed, selection_metadata
from safeedit.progress import bars_off, quiet_logger

SCORES_FORMAT = "safeedit.scores/1"  # the format of a scores file (`safeedit scores`)


def checkpoint_tensors(checkpoint: Checkpoint, include: str | Sequence[str] | None = None,
                       exclude: str | Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating-point tensors of `checkpoint` chosen by `include`/`exclude` patterns (as
    `select_parameters` chooses a model's parameters), from the headers alone."""
    stand_in = SimpleNamespace(named_parameters=lambda: (
        (name, torch.empty(entry.shape, dtype=entry.dtype, device="meta"))
        for name, entry in checkpoint.entries.items()))
    return {name: tuple(t.shape) for name, t in select_parameters(stand_in, include, exclude).items()}


def checkpoint_scores(path: str | os.PathLike, score: str = "magnitude", include: str | Sequence[str] | None = None,
                      exclude: str | Sequence[str] | None = None, options: Mapping[str, Any] | None = None,
                      data: Mapping[str, Iterable] | None = None,
                      progress: bool = True) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """The scores of checkpoint `path` as (shapes, read): `read(name)` computes one tensor's fp32 score from its
    weight when asked, so no pass holds more than a tensor. `wanda` needs `data={"calibration": batches}` and a model
    folder (its config.json): its activation statistics are collected first, from the model offloaded block by
    block; the other streamable scores (magnitude, random) read the weights alone."""
    spec = get_score(score)
    if any(stat.needs_backward for stat in spec.statistics.values()):
        raise SafeEditError(f"score {score!r} needs gradients of data ({', '.join(spec.roles)}), so it cannot be "
                            "computed from a checkpoint tensor by tensor; stream magnitude, random or wanda, or load "
                            "the model (FSDP2 for large ones)")
    score_options = spec.validate_options(options)
    checkpoint = Checkpoint(path)
    shapes = checkpoint_tensors(checkpoint, include, exclude)
    states: dict[str, dict[str, torch.Tensor]] = {}
    if spec.statistics:
        missing = [role for role in spec.roles if role not in (data or {})]
        if missing:
            raise SafeEditError(f"score {score!r} reads {' and '.join(missing)} data; pass data={{{missing[0]!r}: "
                                "batches}} (token batches of the model's tokenizer)")
        with offloaded_model(path, progress) as model:
            params = select_parameters(model, include, exclude)
            states = activation_statistics(model, score, data, params, progress=progress)
        shapes = {name: shape for name, shape in shapes.items() if all(name in state for state in states.values())}

    def read(name: str) -> torch.Tensor:
        own = {arg: {name: state[name].clone()} for arg, state in states.items()}  # (score functions may
        return spec.function({name: checkpoint.tensor(name)}, **own, **score_options)[name]  # work in place)

    return shapes, read


def write_checkpoint_scores(path: str | os.PathLike, out: str | os.PathLike, score: str = "magnitude",
                            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                            options: Mapping[str, Any] | None = None, data: Mapping[str, Iterable] | None = None,
                            progress: bool = True, metadata: Mapping[str, str] | None = None) -> int:
    """Write the scores of checkpoint `path` to `out` (the scores file `safeedit scores` writes: fp32, in name
    order, format safeedit.scores/1, `metadata` added) one tensor at a time, atomically; returns the number of
    scores."""
    shapes, read = checkpoint_scores(path, score, include, exclude, options, data, progress)
    names = sorted(shapes)
    metadata = {"format": SCORES_FORMAT, "score": score, "options": json.dumps(dict(options or {}), sort_keys=True),
                "model": str(path), "streamed": "true", **(metadata or {})}
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        writer = TensorWriter(handle, [(name, torch.float32, shapes[name]) for name in names], metadata)
        for name in names:
            writer.write(name, read(name).float())
        writer.close()
    return sum(math.prod(shape) for shape in shapes.values())


def checkpoint_mask(path: str | os.PathLike, out: str | os.PathLike, ratio: float, score: str = "magnitude",
                    include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                    options: Mapping[str, Any] | None = None, rounding: Rounding = "half_up",
                    data: Mapping[str, Iterable] | None = None, progress: bool = True) -> dict[str, int]:
    """Write the global top-`ratio` mask of `score` over the chosen tensors of checkpoint `path` to `out` (a packed
    mask file), reading one tensor at a time (`checkpoint_scores`). Returns the selected and total counts."""
    shapes, read = checkpoint_scores(path, score, include, exclude, options, data, progress)
    selection = StreamedSelection(shapes, read, ratio, rounding)  # the threshold: the passes before the mask's
    metadata = {**selection_metadata(ratio, "global", rounding), "score": score, "selected": str(selection.k),
                "total": str(selection.total)}
    save_streamed(out, shapes, ((name, selection.mask(name)) for name in sorted(shapes)), metadata)
    return {"selected": selection.k, "total": selection.total}


@contextmanager
def offloaded_model(folder: str | os.PathLike, progress: bool = True) -> Iterator[torch.nn.Module]:
    """The causal LM in `folder` for forward passes on the CPU with its blocks (the classes it names in
    `_no_split_modules`) offloaded to a temporary folder by `accelerate`: each block's weights are read when its
    forward runs and dropped after, so peak memory is the embeddings, the head and one block. Local code only
    (`trust_remote_code` off)."""
    import accelerate.utils.modeling
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SafeEditError(f"{folder}: streaming an activation score needs a model folder with config.json (a "
                            "save_pretrained folder), not a weights file alone")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    from safeedit.models.fsdp import blocks

    block_names = {module: name for name, module in model.named_modules()}
    on_disk = [block_names[block] for block in blocks(model)]
    device_map = {name: "disk" for name in on_disk}
    for name, module in model.named_modules():
        inside = any(name == block or name.startswith(block + ".") for block in on_disk)
        if not inside and (list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))):
            device_map[name] = "cpu"
    def bar(*args: Any, main_process_only: bool = True, **kwargs: Any) -> tqdm:  # accelerate's loading bar, ours
        return tqdm(*args, **{**kwargs, "disable": bars_off(progress)})

    with tempfile.TemporaryDirectory(prefix="safeedit-offload-") as offload, \
            unittest.mock.patch.object(accelerate.utils.modeling, "tqdm", bar), \
            quiet_logger("accelerate.big_modeling"):  # (it warns that offloaded weights are on the meta device)
        yield load_checkpoint_and_dispatch(model, str(folder), device_map=device_map, offload_folder=offload,
                                           dtype=torch.float32)  # (as the in-memory scores load it)
