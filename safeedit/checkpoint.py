"""Safetensors checkpoints read and written one tensor at a time, for models larger than memory.

`Checkpoint` reads a single safetensors file, or a save_pretrained folder with `model.safetensors` or a sharded
`model.safetensors.index.json`: names, dtypes and shapes come from the headers alone, and `tensor(name)` reads
that one tensor (the file is opened for the read and closed after it, so no memory map of a whole shard stays
resident). `TensorWriter` writes one safetensors file whose tensors are declared up front (name, dtype, shape: the
header is written first) and whose bytes then arrive in order; `write_sharded` splits a declared list into
save_pretrained shards with their index. The safetensors library has no incremental writer (`save_file` takes
every tensor at once), hence `TensorWriter`: it writes the documented layout (8-byte little-endian header length,
a JSON header with sorted keys padded with spaces to 8 bytes, the raw tensors in order), the header of
`safeedit.io.canonical_header` that `safeedit.io.save_safetensors` also writes, and its files are read back by
`safetensors.safe_open`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from safeedit.errors import SafeEditError
from safeedit.io import canonical_header, open_safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: its file, dtype and shape (read from the header, no data)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """The tensors of a safetensors checkpoint (a file, or a folder with one file or a sharded index), read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, Entry] = {}
        for file in self._files():
            with open_safetensors(file) as handle:
                for name in handle.keys():  # noqa: SIM118
                    part = handle.get_slice(name)
                    code = part.get_dtype()
                    if code not in DTYPES:
                        raise SafeEditError(f"{file}: tensor {name!r} has dtype {code}, which is not read here")
                    if name in self.entries:
                        raise SafeEditError(f"{self.path}: tensor {name!r} is in two shards; the checkpoint is damaged")
                    self.entries[name] = Entry(file, DTYPES[code], tuple(part.get_shape()))

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if (self.path / INDEX).is_file():
            try:
                index = json.loads((self.path / INDEX).read_text(encoding="utf-8"))
                files = sorted(set(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise SafeEditError(f"{self.path / INDEX}: not a safetensors index (a JSON weight_map of tensor "
                                    "names to files); save the model with save_pretrained again") from None
            return [self.path / file for file in files]
        if (self.path / SINGLE).is_file():
            return [self.path / SINGLE]
        if self.path.is_dir():
            raise SafeEditError(f"{self.path}: no {SINGLE} or {INDEX}; save the model with save_pretrained "
                                "(safetensors) first")
        raise SafeEditError(f"{self.path}: no such file or folder; check the path")

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, read from its file now (a fresh CPU tensor)."""
        with open_safetensors(self.entries[name].file) as handle:
            return handle.get_tensor(name)

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time, in the order given (default: the files' order)."""
        for name in self.names if names is None else names:
            yield name, self.tensor(name)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())


def _header(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in CODES:
            raise SafeEditError(f"tensor {name!r} has dtype {dtype}, which safetensors does not store here")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return canonical_header(header)


class TensorWriter:
    """One safetensors file written tensor by tensor into an open binary `handle`, in the declared order."""

    def __init__(self, handle: BinaryIO, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.handle, self.specs, self.next = handle, list(specs), 0
        handle.write(_header(self.specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.specs[self.next] if self.next < len(self.specs) else None
        if expected is None or expected[0] != name:
            raise ValueError(f"tensor {name!r} written out of order (expected {expected and expected[0]!r})")
        if tensor.dtype != expected[1] or tuple(tensor.shape) != tuple(expected[2]):
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {expected[1]} "
                             f"{tuple(expected[2])}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self.handle.write(memoryview(flat.view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"{len(self.specs) - self.next} declared tensors were never written")


def plan_shards(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Consecutive groups of `specs`, each at most `max_shard_bytes` unless one tensor alone is larger
    (save_pretrained's rule)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded(folder: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[Path]:
    """Write `tensors` (in the order of `specs`) into `folder` as save_pretrained does: `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`. Only one tensor is held at a
    time. Returns the files written."""
    shards = plan_shards(specs, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(1, len(shards) + 1)]
    stream = iter(tensors)
    for name, shard in zip(names, shards, strict=True):
        with open(folder / name, "wb") as handle:
            writer = TensorWriter(handle, shard, {"format": "pt"})
            for _ in shard:
                writer.write(*next(stream))
            writer.close()
    if next(stream, None) is not None:
        raise ValueError("more tensors than declared")
    written = [folder / name for name in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s[2]) * s[1].itemsize for s in specs)},
                 "weight_map": {spec[0]: name for name, shard in zip(names, shards, strict=True) for spec in shard}}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(folder / INDEX)
    return written
