"""Masks: a bool tensor per parameter name, chosen from scores, combined, summarised and saved as safetensors.

Selection takes exactly round(ratio · count) entries, halves rounded up (`rounding="half_up"`, the default), or
int(ratio · count) (`rounding="floor"`, the count of the public SalUn and WAGLE code and of mergekit's magnitude
trim) but then at least one entry per selection unit (the whole set, a tensor or a row). The global and
per-tensor scopes never concatenate or sort the scores: a two-pass radix select over the order-preserving
integer image of the float32 scores (16 high bits, then 16 low bits, counted with `torch.bincount` chunk by
chunk) finds the exact k-th largest value, so the extra memory is a few chunk-sized buffers whatever the model
size. The row scope finds each row's k-th largest key with `torch.kthvalue` (no sort), a block of rows at a time.

On disk a mask is packed bits (`pack_bits`, `PACKED_FORMAT`), read lazily (`MaskFile`); files of one bool byte per
weight (`MASK_FORMAT`, written before) still load. `StreamedSelection` and `save_streamed` select and write a global
mask from scores read one tensor at a time (`safeedit.streaming`), for models larger than memory.

Ties are broken deterministically: among equal scores, the entry that comes first wins, where entries are
ordered by parameter name, then by flat (row-major) index.

Scores sharded by FSDP2 (`DTensor`, see `safeedit.sharding`) give exactly the single-process mask, sharded the
same way: each process counts its own shards and the two 65536-bucket histograms are summed across processes
(two all-reduces, per tensor for the per-tensor scope); only when tied entries straddle the threshold does a
third all-reduce tell each process how many ties the processes before it hold. Rows are whole on each process,
so the row scope needs no communication except for 1-D tensors, which are one row (selected as a tensor).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from safeedit.checkpoint import TensorWriter
from safeedit.errors import SafeEditError
from safeedit.io import atomic_path, open_safetensors, save_safetensors
from safeedit.sharding import Shards, count_nonzero, found_anywhere, gathered, is_sharded, local, wrap_like

Scope = Literal["global", "tensor", "row"]
SCOPES: tuple[str, ...] = ("global", "tensor", "row")
Rounding = Literal["half_up", "floor"]
ROUNDINGS: tuple[str, ...] = ("half_up", "floor")
CHUNK = 1 << 22  # elements per working buffer (16 MiB of int32 keys)
MASK_FORMAT = "safeedit.mask/1"  # one bool byte per weight (every mask written before packed bits)
PACKED_FORMAT = "safeedit.mask/2"  # packed bits: see `pack_bits`; the shapes are in the metadata


def target_count(ratio: float, total: int, rounding: Rounding = "half_up") -> int:
    """round(ratio · total), halves rounded up; or with `floor`, int(ratio · total) as the reference code counts
    (SalUn's and WAGLE's `int(n * r)`, mergekit's `int(density * numel)`), but at least 1 of a non-empty set: a
    floor that would select nothing selects the single highest score (mergekit asserts instead)."""
    if rounding == "floor":
        return min(total, max(1, int(ratio * total)))
    return math.floor(ratio * total + 0.5)


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, int | float) and 0.0 < ratio <= 1.0):
        raise SafeEditError(f"ratio must be in (0, 1], got {ratio!r}; e.g. 0.5 keeps the top half of the scores")


def _sortable(values: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values (−0.0 and +0.0 tie, as they compare equal)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32)  # x + 0.0 turns −0.0 into +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _chunks(tensor: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start : start + CHUNK]


def _kth_largest_key(tensors: list[torch.Tensor], k: int, shards: Shards | None = None) -> tuple[int, int, int]:
    """The k-th largest sortable key over all `tensors` (and the other processes' shards of them, with `shards`),
    how many keys are strictly larger and how many equal it."""
    device = tensors[0].device
    high_counts = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for tensor in tensors:
        for _, chunk in _chunks(tensor):
            high_counts += torch.bincount((_sortable(chunk) >> 16) + 32768, minlength=1 << 16).to(device)
    if shards is not None:
        shards.sum(high_counts)
    high, above = _bucket_holding(high_counts, k)
    low_counts = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for tensor in tensors:
        for _, chunk in _chunks(tensor):
            keys = _sortable(chunk)
            in_bucket = keys[(keys >> 16) == high - 32768]
            if in_bucket.numel():
                low_counts += torch.bincount(in_bucket & 0xFFFF, minlength=1 << 16).to(device)
    if shards is not None:
        shards.sum(low_counts)
    low, above_low = _bucket_holding(low_counts, k - above)
    key = ((high - 32768) << 16) | low
    return key, above + above_low, int(low_counts[low])


def _bucket_holding(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Index of the bucket holding the k-th largest element, and the count in buckets above it."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], device=counts.device)).item())
    bucket = counts.numel() - 1 - position
    above = int(from_top[position - 1].item()) if position > 0 else 0
    return bucket, above


def _ties_elsewhere(tensors: list[torch.Tensor], key: int, shards: Shards | None) -> tuple[list[int], list[int]]:
    """Per tensor, how many entries equal to `key` the processes before this one hold, and those after it."""
    if shards is None:
        return [0] * len(tensors), [0] * len(tensors)
    counts = torch.zeros(shards.world, len(tensors), dtype=torch.int64)
    for i, tensor in enumerate(tensors):
        counts[shards.index, i] = sum(int(torch.count_nonzero(_sortable(chunk) == key)) for _, chunk in _chunks(tensor))
    shards.sum(counts)
    return counts[: shards.index].sum(0).tolist(), counts[shards.index + 1 :].sum(0).tolist()


def _select_top_k(
    named: Mapping[str, torch.Tensor], k: int, shards: Shards | None = None
) -> dict[str, torch.Tensor]:
    """Exactly k entries with the largest scores over all tensors in `named` (ties: name, then flat index);
    with `shards`, the local part of the mask over this process's shards of the tensors."""
    names = sorted(named)
    tensors = [local(named[name]) for name in names]
    masks = {
        name: torch.zeros(t.shape, dtype=torch.bool, device=t.device) for name, t in zip(names, tensors, strict=True)
    }
    total = sum(named[name].numel() for name in names)
    if k == 0:
        return masks
    if k == total:
        return {name: ~mask for name, mask in masks.items()}
    threshold, greater, equal = _kth_largest_key(tensors, k, shards)
    ties_left = k - greater  # how many of the entries equal to the threshold are selected, the first ones in order
    before, after = _ties_elsewhere(tensors, threshold, shards if equal > ties_left else None)
    for name, tensor, ties_before, ties_after in zip(names, tensors, before, after, strict=True):
        ties_left = _fill_mask(masks[name], tensor, threshold, ties_left - ties_before) - ties_after
    return masks


def _fill_mask(mask: torch.Tensor, scores: torch.Tensor, threshold: int, ties_left: int) -> int:
    """Set `mask` where `scores` lie above the sortable key `threshold`, and at the first `ties_left` entries equal to
    it (flat order); returns how many ties are still to take after this tensor (negative: more ties than needed)."""
    flat_mask = mask.view(-1)
    for start, chunk in _chunks(scores):
        keys = _sortable(chunk)
        selected = keys > threshold
        is_tie = keys == threshold
        n_ties = int(torch.count_nonzero(is_tie))
        take = min(max(ties_left, 0), n_ties)
        if take == n_ties:
            selected |= is_tie
        elif take:
            selected[is_tie.nonzero().view(-1)[:take]] = True
        ties_left -= n_ties
        flat_mask[start : start + chunk.numel()] = selected
    return ties_left


def _select_rows(scores: torch.Tensor, ratio: float, rounding: Rounding = "half_up") -> torch.Tensor:
    """Per output row (dim 0) the top `target_count(ratio, row length)` entries; 1-D tensors count as one row.

    Each row's k-th largest key comes from `torch.kthvalue` (a selection, no sort); the entries above it are taken,
    and of the entries equal to it the first ones in the row (an int32 running count), the stable sort's choice."""
    rows = scores.reshape(1, -1) if scores.dim() < 2 else scores.flatten(1)  # (a shard may have no row)
    n = rows.shape[1]
    k = target_count(ratio, n, rounding)
    if k == 0 or k == n:
        return torch.full(scores.shape, k == n and n > 0, dtype=torch.bool, device=scores.device)
    mask = torch.empty(rows.shape, dtype=torch.bool, device=scores.device)
    block = max(1, CHUNK // n)
    for start in range(0, rows.shape[0], block):
        keys = _sortable(rows[start : start + block])
        kth = keys.kthvalue(n - k + 1, dim=1, keepdim=True).values
        part = mask[start : start + block]
        torch.gt(keys, kth, out=part)
        ties_left = k - part.sum(1, keepdim=True, dtype=torch.int32)
        ties = keys == kth
        part |= ties & (ties.cumsum(1, dtype=torch.int32) <= ties_left)
    return mask.view(scores.shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The bool tensor as 1-D uint8, 8 entries per byte in `numpy.packbits` order (bitorder "big"): entry i of the
    row-major flattened mask is bit 7 − i mod 8 (128 for the first) of byte i // 8; the last byte's unused bits are
    0."""
    flat = mask.detach().reshape(-1).to("cpu").numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="big"))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool tensor of `shape` that `pack_bits` packed into `packed`."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise ValueError(f"{packed.numel()} {packed.dtype} bytes do not hold {count} packed bits")
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="big")
    return torch.from_numpy(bits.view(np.bool_)).view(shape)


def packed_metadata(metadata: Mapping[str, str], shapes: Mapping[str, list[int]]) -> dict[str, str]:
    """A packed mask file's metadata: the caller's, the format marker and every entry's shape (JSON)."""
    return {**metadata, "format": PACKED_FORMAT, "shapes": json.dumps(dict(shapes), sort_keys=True)}


class MaskFile(Mapping[str, torch.Tensor]):
    """The entries of a mask file, read lazily: opening checks the format and (packed) that every entry's byte count
    fits the shape in the metadata; an entry is read, and unpacked, each time it is asked for (nothing is kept)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open_safetensors(self.path) as handle:
            metadata = dict(handle.metadata() or {})
            fmt = metadata.get("format")
            if fmt not in (MASK_FORMAT, PACKED_FORMAT):
                raise SafeEditError(f"{path}: not a safeedit mask (metadata format is {fmt!r})")
            self.packed = fmt == PACKED_FORMAT
            entries = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape())
                       for name in handle.keys()}  # noqa: SIM118
        self.shapes = {name: tuple(shape) for name, (_, shape) in entries.items()}
        if self.packed:
            self.shapes = self._packed_shapes(metadata.get("shapes"), entries)
        else:
            wrong = next((name for name, (dtype, _) in entries.items() if dtype != "BOOL"), None)
            if wrong is not None:
                raise SafeEditError(f"{path}: mask entry {wrong!r} has dtype {entries[wrong][0]}; masks hold bool "
                                    "tensors")
        self.metadata = {k: v for k, v in metadata.items() if k not in ("format", "selected", "total", "shapes")}

    def _packed_shapes(self, text: str | None, entries: Mapping[str, tuple[str, list[int]]]) -> dict:
        fix = "the file is damaged or was not written by Mask.save; write the mask again"
        try:
            shapes = json.loads(text or "")
        except ValueError:
            shapes = None
        if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
            for s in shapes.values()
        ):
            raise SafeEditError(f"{self.path}: packed mask without readable shapes in its metadata; {fix}")
        if set(shapes) != set(entries):
            name = sorted(set(shapes) ^ set(entries))[0]
            raise SafeEditError(f"{self.path}: entry {name!r} is in the file or in its metadata shapes, not both; "
                                f"{fix}")
        for name, (dtype, shape) in entries.items():
            if dtype != "U8" or shape != [(math.prod(shapes[name]) + 7) // 8]:
                raise SafeEditError(f"{self.path}: packed entry {name!r} is {dtype} {shape}, which does not hold the "
                                    f"{tuple(shapes[name])} bits its metadata says; {fix}")
        return {name: tuple(shapes[name]) for name in entries}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        with open_safetensors(self.path) as handle:
            tensor = handle.get_tensor(name)
        return unpack_bits(tensor, self.shapes[name]) if self.packed else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class _Reads(Sequence[torch.Tensor]):
    """Tensors read on access (`read(name)`), so a pass over them holds one at a time."""

    def __init__(self, names: Sequence[str], read: Callable[[str], torch.Tensor]) -> None:
        self.names, self.read = list(names), read

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self.read(self.names[index])


NAN_FIX = "NaN; check the model weights and the data"


def _check_selection(ratio: float, rounding: Rounding, scores: Mapping) -> None:
    """The checks every top-k selection makes before reading a score: ratio, rounding, something to select."""
    _check_ratio(ratio)
    if rounding not in ROUNDINGS:
        raise SafeEditError(f"unknown mask rounding {rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
    if not scores:
        raise SafeEditError("no scores to select from; check the parameter patterns")


def _check_floating(name: str, scores: torch.Tensor) -> None:
    if not torch.is_floating_point(scores):
        raise SafeEditError(f"scores for {name!r} have dtype {scores.dtype}; scores must be floating point")


def _has_nan(scores: torch.Tensor) -> bool:
    return any(torch.isnan(chunk).any() for _, chunk in _chunks(scores))  # chunked: no full-size temporary


def selection_metadata(ratio: float, scope: Scope, rounding: Rounding) -> dict[str, str]:
    """What a top-k mask's metadata says of its selection (`rounding` only when floor: half-up masks keep their
    bytes as before)."""
    return {"ratio": repr(float(ratio)), "scope": scope, **({"rounding": rounding} if rounding == "floor" else {})}


class StreamedSelection:
    """`Mask.top_k(scores, ratio, "global")` for scores too large to hold: `read(name)` gives one score tensor (of
    `shapes[name]`) at a time. The threshold takes two passes over the scores (high and low histograms, checking
    each tensor for NaN); a third counts each tensor's ties only when tied entries straddle it. Then `mask(name,
    scores)` gives any tensor's mask, in any order, with the same exact selection and tie rule."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], torch.Tensor], ratio: float,
                 rounding: Rounding = "half_up") -> None:
        _check_selection(ratio, rounding, shapes)
        self.shapes, self.read = shapes, read
        names = sorted(shapes)
        self.total = sum(math.prod(shape) for shape in shapes.values())
        self.k = target_count(ratio, self.total, rounding)
        self.everything: bool | None = None  # all False (k = 0) or all True (k = total): no threshold
        if self.k in (0, self.total):
            for name in names:
                self._checked(name)
            self.everything = self.k == self.total
            return
        self.threshold, greater, equal = _kth_largest_key(_Reads(names, self._checked), self.k)
        ties_left = self.k - greater
        self.ties_at = dict.fromkeys(names, ties_left)  # the ties still to take when each tensor's turn comes
        if equal > ties_left:
            for name in names:
                self.ties_at[name] = ties_left
                ties_left -= sum(int(torch.count_nonzero(_sortable(c) == self.threshold))
                                 for _, c in _chunks(read(name)))

    def _checked(self, name: str) -> torch.Tensor:
        tensor = self.read(name)
        _check_floating(name, tensor)
        if tuple(tensor.shape) != tuple(self.shapes[name]):
            raise SafeEditError(f"scores for {name!r} have shape {tuple(tensor.shape)}, not "
                                f"{tuple(self.shapes[name])}")
        if _has_nan(tensor):
            raise SafeEditError(f"scores for {name!r} contain {NAN_FIX}")
        return tensor

    def mask(self, name: str, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The mask of tensor `name` (`scores`: its scores when the caller has them, else read again)."""
        if self.everything is not None:
            return torch.full(tuple(self.shapes[name]), self.everything, dtype=torch.bool)
        scores = self.read(name) if scores is None else scores
        mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
        _fill_mask(mask, scores, self.threshold, self.ties_at[name])
        return mask


def save_streamed(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]],
                  masks: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> None:
    """Write a packed mask file (what `Mask.save` writes for the same mask) from (name, mask) pairs that arrive one
    at a time in name order, atomically; `metadata` must hold the counts `selected` and `total`."""
    names = sorted(shapes)
    specs = [(name, torch.uint8, ((math.prod(shapes[name]) + 7) // 8,)) for name in names]
    info = packed_metadata(metadata, {name: list(shapes[name]) for name in names})
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = TensorWriter(handle, specs, info)
        for name, mask in masks:
            writer.write(name, pack_bits(mask))
        writer.close()


@dataclass
class Mask:
    """A bool tensor per parameter name: True marks the weights an edit may change (or, for pruning, remove).

    Entries may be FSDP2 shards (`DTensor`, as `top_k` gives for sharded scores); counts, summaries and
    `full_tensor` then communicate, so every process calls them."""

    tensors: Mapping[str, torch.Tensor]  # a dict, or a `MaskFile` read lazily (`Mask.load`)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, tensor in ({} if isinstance(self.tensors, MaskFile) else self.tensors).items():
            if tensor.dtype != torch.bool:
                raise SafeEditError(f"mask entry {name!r} has dtype {tensor.dtype}; masks hold bool tensors")
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    # --- selection -------------------------------------------------------------------------------------
    @classmethod
    def top_k(
        cls,
        scores: Mapping[str, torch.Tensor],
        ratio: float,
        scope: Scope = "global",
        metadata: Mapping[str, str] | None = None,
        rounding: Rounding = "half_up",
    ) -> Mask:
        """Select the highest-scoring round(ratio · count) entries, counted over all tensors (`global`), per
        tensor (`tensor`) or per output row (`row`). With `rounding="floor"` the count is int(ratio · count), the
        reference code's, but at least 1 per selection unit (the whole set, each tensor, each row); the metadata
        then says `rounding: floor` (half-up masks keep their metadata, and bytes, as before).

        FSDP2-sharded scores (`DTensor`) give the single-process mask sharded like them; every process of the
        mesh must call this (it communicates)."""
        if scope not in SCOPES:
            raise SafeEditError(f"unknown mask scope {scope!r}; choose one of: {', '.join(SCOPES)}")
        _check_selection(ratio, rounding, scores)
        for name, tensor in scores.items():
            _check_floating(name, tensor)
        shards = Shards.of(scores)
        nan = [name for name, t in scores.items() if _has_nan(local(t))]
        if found_anywhere(nan, shards):
            where = f"scores for {nan[0]!r}" if nan else "scores on another process"
            raise SafeEditError(f"{where} contain {NAN_FIX}")

        def top(name: str, t: torch.Tensor, k: int) -> torch.Tensor:
            return _select_top_k({name: t}, k, shards)[name]

        if scope == "global":
            total = sum(t.numel() for t in scores.values())
            selected = _select_top_k(scores, target_count(ratio, total, rounding), shards)
        elif scope == "tensor":
            selected = {name: top(name, t, target_count(ratio, t.numel(), rounding)) for name, t in scores.items()}
        else:  # whole rows are local to a process, but a 1-D tensor is one row, split across processes
            selected = {
                name: top(name, t, target_count(ratio, t.numel(), rounding)) if shards is not None and t.dim() < 2
                else _select_rows(local(t), ratio, rounding)
                for name, t in scores.items()
            }
        if shards is not None:
            selected = {name: wrap_like(part, scores[name]) for name, part in selected.items()}
        info = {**selection_metadata(ratio, scope, rounding), **(metadata or {})}
        return cls({name: selected[name] for name in scores}, info)

    @classmethod
    def full(cls, shapes: Mapping[str, torch.Tensor | torch.Size], value: bool = True) -> Mask:
        """All-True (or all-False) mask over the given tensors or shapes: 'no mask' in the same code path."""
        return cls(
            {name: torch.full(tuple(getattr(s, "shape", s)), value, dtype=torch.bool) for name, s in shapes.items()}
        )

    # --- set operations (a name missing on one side counts as all False) ------------------------------
    def _aligned(self, other: Mask) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name in dict.fromkeys([*self.tensors, *other.tensors]):
            a, b = self.tensors.get(name), other.tensors.get(name)
            if a is not None and b is not None and a.shape != b.shape:
                raise SafeEditError(f"masks disagree on the shape of {name!r}: {tuple(a.shape)} vs {tuple(b.shape)}")
            a = a if a is not None else torch.zeros_like(b)
            b = b if b is not None else torch.zeros_like(a)
            yield name, a, b.to(a.device)

    def __or__(self, other: Mask) -> Mask:
        return Mask({name: a | b for name, a, b in self._aligned(other)}, {"op": "union"})

    def __and__(self, other: Mask) -> Mask:
        return Mask({name: a & b for name, a, b in self._aligned(other)}, {"op": "intersection"})

    def __sub__(self, other: Mask) -> Mask:
        return Mask({name: a & ~b for name, a, b in self._aligned(other)}, {"op": "difference"})

    def __invert__(self) -> Mask:
        return Mask({name: ~t for name, t in self.tensors.items()}, {"op": "complement"})

    def jaccard(self, other: Mask) -> float:
        """|A ∩ B| / |A ∪ B| (1.0 when both are empty)."""
        inter = union = 0
        for _, a, b in self._aligned(other):
            inter += count_nonzero(a & b)
            union += count_nonzero(a | b)
        return inter / union if union else 1.0

    # --- summaries ------------------------------------------------------------------------------------
    @property
    def selected(self) -> int:
        return sum(count_nonzero(t) for t in self.tensors.values())

    @property
    def total(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def density(self) -> float:
        return self.selected / self.total if self.total else 0.0

    def layer_stats(self) -> list[dict]:
        """Per tensor: selected count, size and density (share selected); sparsity is 1 − density."""
        stats = []
        for name, t in self.tensors.items():
            chosen = count_nonzero(t)
            stats.append({"name": name, "selected": chosen, "total": t.numel(), "density": chosen / max(1, t.numel())})
        return stats

    def summary(self) -> dict:
        return {
            "selected": self.selected,
            "total": self.total,
            "density": self.density,
            "metadata": dict(self.metadata),
            "layers": self.layer_stats(),
        }

    # --- compatibility and I/O ------------------------------------------------------------------------
    def check_matches(self, model: nn.Module | Mapping[str, torch.Tensor], what: str = "mask") -> None:
        """Raise a clear error unless every mask entry names a parameter of the same shape; `what` names the mask
        in the message (e.g. its file)."""
        shapes = {n: p.shape for n, p in (model.named_parameters() if isinstance(model, nn.Module) else model.items())}
        for name, tensor in self.tensors.items():
            if name not in shapes:
                raise SafeEditError(
                    f"{what} entry {name!r} names no parameter of the model; was it made for another model?"
                )
            if tuple(shapes[name]) != tuple(tensor.shape):
                raise SafeEditError(
                    f"{what} entry {name!r} has shape {tuple(tensor.shape)} but the model's parameter has "
                    f"{tuple(shapes[name])}; it was made for another architecture"
                )

    def to(self, device: str | torch.device) -> Mask:
        return Mask({name: t.to(device) for name, t in self.tensors.items()}, dict(self.metadata))

    def full_tensor(self) -> Mask:
        """The mask with every FSDP-sharded entry gathered whole (a collective: call it on every process); plain
        entries as they are. Save a sharded mask this way, from one process."""
        return Mask({name: gathered(t) for name, t in self.tensors.items()}, dict(self.metadata))

    def save(self, path: str | os.PathLike, packed: bool = True) -> None:
        """Write the mask atomically: packed bits (`PACKED_FORMAT`, 1/8 of a bool byte per weight), or with
        `packed=False` one bool byte per weight (`MASK_FORMAT`, the format before packing)."""
        sharded = next((name for name, t in self.tensors.items() if is_sharded(t)), None)
        if sharded is not None:
            raise SafeEditError(
                f"mask entry {sharded!r} is sharded across processes; gather it with mask.full_tensor() on every "
                "process, then save from one (e.g. rank 0)"
            )
        metadata = {**self.metadata, "selected": str(self.selected), "total": str(self.total)}
        if not packed:
            save_safetensors(self.tensors, path, {**metadata, "format": MASK_FORMAT})
            return
        shapes = {name: list(t.shape) for name, t in self.tensors.items()}
        packed = {name: pack_bits(t) for name, t in self.tensors.items()}
        save_safetensors(packed, path, packed_metadata(metadata, shapes))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        """Read a mask file of either format lazily: each entry is read (and unpacked) when asked for."""
        tensors = MaskFile(path)
        return cls(tensors, tensors.metadata)

    def __repr__(self) -> str:
        info = json.dumps({k: self.metadata[k] for k in sorted(self.metadata)})
        return f"Mask({len(self.tensors)} tensors, {self.selected}/{self.total} selected, {info})"
