"""Data-free merges of checkpoints larger than memory (`safeedit merge --stream`): one tensor of each model at a
time, written tensor by tensor into save_pretrained shards.

For every merged tensor, in the base model's parameter order, the base's and each task model's tensor are read
(`safeedit.checkpoint.Checkpoint`), cast to float32 as the in-memory merge loads them, and merged by the method's
own code on a one-tensor `MergeSetting`: task arithmetic, TIES and DARE (whose random draws continue from one tensor
to the next: `dare_vectors`'s `generators`) give exactly the merge `safeedit merge` computes in memory. TIES's
`trim: global` (one threshold per task vector over all its tensors) first finds each task's threshold by streaming
the vector (`masks.StreamedSelection`: two or three more reads of every tensor), then trims tensor by tensor. The
result is cast to the output dtype and written; the other tensors of the base checkpoint are copied (floating ones
cast to the output dtype, as the in-memory merge writes them). Peak memory is a few copies of the largest tensor
per model, not the model.

What is merged: every floating-point parameter of the base (named by its checkpoint, ordered as the model class
of its config.json builds them, on the meta device), except names matching `exclude` and, for a classifier
without `merge_heads`, the head outside the model's body. Task models must be saved as the base's class (the same
tensor names); other layouts and the learned merges need the in-memory path. Not written here: the run record and
report of the in-memory path (`merge.json` names the method, its options and the SHA-256 of every input and
output file).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from safeedit.checkpoint import Checkpoint, write_sharded
from safeedit.errors import SafeEditError
from safeedit.io import atomic_dir, sha256_file
from safeedit.masks import StreamedSelection
from safeedit.merge.baselines import density_of, elect
from safeedit.merge.dare import dare_merge
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import merged_parameters
from safeedit.methods import get_method

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STREAMED = ("task_arithmetic", "ties", "dare")
DEFAULT_SHARD_BYTES = 2 * 10**9  # save_pretrained's "2GB", as the in-memory merge writes (models.export)
# Files of a model folder besides its weights that the merged folder takes from the base model.
COPIED = re.compile(r"(generation_config|tokenizer.*|special_tokens_map|vocab.*|merges|added_tokens|chat_template.*"
                    r"|preprocessor_config|processor_config)\.(json|txt|model|jinja)$")


def parameter_order(folder: Path, names: list[str]) -> tuple[list[str], str, bool]:
    """`names` (checkpoint tensor names) ordered as the in-memory merge visits them: the body's parameters first,
    then the rest, each in the order the model class builds them (meta device, no weights); the body's name prefix;
    and whether the class is a classifier with its own head. Without a config.json naming a transformers
    architecture: the checkpoint's order, no body."""
    from safeedit.merge.own import body_prefix, is_classifier

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return names, "", False
    import transformers

    architecture = ((config.get("architectures") if isinstance(config, dict) else None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if model_class is None:
        return names, "", False
    with torch.device("meta"):
        model = model_class(transformers.AutoConfig.from_pretrained(folder))
    prefix = body_prefix(model)
    order = [name for name, _ in model.named_parameters()]
    present = set(names)
    absent = [name for name in order if name not in present]
    if absent:
        raise SafeEditError(f"{folder}: parameter {absent[0]!r} of {architecture} is not in its checkpoint under "
                            "that name (an older layout?); merge without --stream")
    order = [n for n in order if n.startswith(prefix)] + [n for n in order if not n.startswith(prefix)]
    return order, prefix, is_classifier(model)


def _checkpoint(spec: str, where: str) -> Checkpoint:
    if not Path(spec).is_dir():
        raise SafeEditError(f"{where}: {spec}: --stream reads local save_pretrained folders; download the model "
                            "first (huggingface-cli download)")
    return Checkpoint(spec)


def _check_layout(base: Checkpoint, task: Checkpoint, spec: str, merged: list[str]) -> None:
    """The task checkpoint has the base's tensor names, and each merged tensor its shape and dtype."""
    extra = sorted(set(task.entries) - set(base.entries))
    missing = sorted(set(base.entries) - set(task.entries))
    if extra or missing:
        name = (missing or extra)[0]
        where = "of the base model is missing" if missing else "is not in the base model"
        raise SafeEditError(f"task model {spec}: tensor {name!r} {where}; --stream merges task models saved as the "
                            "base's class (the same tensors); merge without --stream otherwise")
    for name in merged:
        mine, theirs = base.entries[name], task.entries[name]
        if (mine.shape, mine.dtype) != (theirs.shape, theirs.dtype):
            raise SafeEditError(f"task model {spec}: tensor {name!r} is {theirs.shape} {theirs.dtype}, the base has "
                                f"{mine.shape} {mine.dtype}; task models must be fine-tunes of the base model")


def stream_merge(scenario: Any, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 notes: list[str] | None = None) -> dict[str, Any]:
    """Merge the `kind: merge` scenario's one data-free method into the new folder `out` (written whole or not at
    all), tensor by tensor; returns the summary also written as `merge.json`."""
    (method, options), = scenario.method_options().items()
    if method not in STREAMED:
        raise SafeEditError(f"--stream merges {', '.join(STREAMED)}; {method} needs the models in memory")
    entries = scenario.tasks()
    base = _checkpoint(scenario.base_model, "base_model")
    tasks = {task: _checkpoint(entry.model, f"task model {task}") for task, entry in entries.items()}
    floating = [name for name, entry in base.entries.items() if entry.dtype.is_floating_point]
    order, prefix, classifier = parameter_order(Path(scenario.base_model), floating)
    excluded: dict[str, str] = {}
    for name in order:
        if scenario.exclude and re.search(scenario.exclude, name):
            excluded[name] = f"matches exclude {scenario.exclude!r}"
        elif classifier and not scenario.merge_heads and not name.startswith(prefix):
            excluded[name] = "classifier head: each task model keeps its own (merge_heads: true merges heads)"
    merged = [name for name in order if name not in excluded]
    if not merged:
        raise SafeEditError(f"no parameter of {scenario.base_model} is left to merge (exclude {scenario.exclude!r}); "
                            "exclude less")
    for task, entry in entries.items():
        _check_layout(base, tasks[task], entry.model, merged)
    from safeedit.merge.own import storage_dtype

    dtype_name = scenario.dtype or storage_dtype(scenario.base_model)
    dtype = DTYPES[dtype_name]
    rest = [name for name in base.names if name not in set(merged)]
    specs = [(name, dtype if base.entries[name].dtype.is_floating_point else base.entries[name].dtype,
              base.entries[name].shape) for name in [*merged, *rest]]
    weights = {task: entry.weight for task, entry in entries.items()}
    densities = {task: entry.density for task, entry in entries.items() if entry.density is not None} or None
    spec, generators = get_method("merge", method), {}
    trims = _global_trims(base, tasks, merged, options, densities) if getattr(options, "trim", None) == "global" \
        else None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in merged:
            setting = MergeSetting({name: base.tensor(name).float()},
                                   {task: {name: ck.tensor(name).float()} for task, ck in tasks.items()}, {}, {},
                                   weights, densities)
            if method == "dare":
                parameters = dare_merge(setting, options, scenario.seed, generators)
            elif trims is not None:  # TIES's global trim: each task's threshold found beforehand
                kept = {task: {name: v[name] * trims[task].mask(name, v[name].abs()).to(v[name].dtype)}
                        for task, v in setting.vectors.items()}
                merged_vector = elect(kept, "global", weights, options.normalize)
                parameters = merged_parameters(setting.base, {"ties": merged_vector}, {"ties": options.scale})
            else:
                parameters = spec.function(setting, options, scenario.seed, False).parameters
            yield name, parameters[name].to(dtype)
        for name in rest:
            tensor = base.tensor(name)
            yield name, tensor.float().to(dtype) if torch.is_floating_point(tensor) else tensor

    summary = {"method": method, "scale": getattr(options, "scale", None), "keep": getattr(options, "keep", None),
               "trim": getattr(options, "trim", None), "density": getattr(options, "density", None),
               "seed": scenario.seed if method == "dare" else None, "exclude": scenario.exclude,
               "options": options.model_dump(), "dtype": dtype_name, "streamed": True,
               "base": {scenario.base_model: _file_hashes(base)},
               "tasks": {entry.model: _file_hashes(tasks[task]) for task, entry in entries.items()},
               "weights": weights, "densities": {task: entry.density for task, entry in entries.items()},
               "merged_tensors": len(merged), "excluded": excluded, "notes": list(notes or [])}
    with atomic_dir(out) as folder:
        written = write_sharded(folder, specs, tensors(), max_shard_bytes)
        _copy_model_files(Path(scenario.base_model), folder, dtype_name)
        summary["files"] = {path.name: sha256_file(path) for path in written}
        (folder / "merge.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _global_trims(base: Checkpoint, tasks: dict[str, Checkpoint], merged: list[str], options: Any,
                  densities: dict[str, float] | None) -> dict[str, StreamedSelection]:
    """Each task vector's global top-`keep` selection by |τ| over the merged tensors (TIES `trim: global`, as
    `baselines.trimmed` selects it with `Mask.top_k`), its threshold found by streaming the vector."""
    shapes = {name: base.entries[name].shape for name in merged}
    keep = {task: densities.get(task, options.keep) for task in tasks} if densities else options.keep

    def magnitude(task: Checkpoint) -> Any:
        return lambda name: (task.tensor(name).float() - base.tensor(name).float()).abs()

    return {name: StreamedSelection(shapes, magnitude(task), density_of(keep, name)) for name, task in tasks.items()}


def _file_hashes(checkpoint: Checkpoint) -> dict[str, str]:
    return {file.name: sha256_file(file) for file in sorted({entry.file for entry in checkpoint.entries.values()})}


def _copy_model_files(base: Path, folder: Path, dtype: str) -> None:
    """config.json (its dtype set to the merge's) and the base's tokenizer and generation files."""
    config_path = base / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in sorted(base.iterdir()):
        if path.is_file() and COPIED.fullmatch(path.name):
            shutil.copyfile(path, folder / path.name)
