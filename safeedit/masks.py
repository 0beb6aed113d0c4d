"""Masks: a bool tensor per parameter name, chosen from scores, combined, summarised and saved as safetensors.

Selection takes exactly round(ratio · count) entries, halves rounded up (`rounding="half_up"`, the default), or
int(ratio · count) (`rounding="floor"`, the count of the public SalUn and WAGLE code and of mergekit's magnitude
trim) but then at least one entry per selection unit (the whole set, a tensor or a row). The global and
per-tensor scopes never concatenate or sort the scores: a two-pass radix select over the order-preserving
integer image of the float32 scores (16 high bits, then 16 low bits, counted with `torch.bincount` chunk by
chunk) finds the exact k-th largest value, so the extra memory is a few chunk-sized buffers whatever the model
size. The row scope sorts one block of rows at a time with a stable sort.

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.io import load_safetensors, save_safetensors
from safeedit.sharding import Shards, count_nonzero, found_anywhere, gathered, is_sharded, local, wrap_like

Scope = Literal["global", "tensor", "row"]
SCOPES: tuple[str, ...] = ("global", "tensor", "row")
Rounding = Literal["half_up", "floor"]
ROUNDINGS: tuple[str, ...] = ("half_up", "floor")
CHUNK = 1 << 22  # elements per working buffer (16 MiB of int32 keys)
MASK_FORMAT = "safeedit.mask/1"


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
        ties_left -= ties_before
        flat_mask = masks[name].view(-1)
        for start, chunk in _chunks(tensor):
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
        ties_left -= ties_after
    return masks


def _select_rows(scores: torch.Tensor, ratio: float, rounding: Rounding = "half_up") -> torch.Tensor:
    """Per output row (dim 0) the top `target_count(ratio, row length)` entries; 1-D tensors count as one row."""
    rows = scores.reshape(1, -1) if scores.dim() < 2 else scores.flatten(1)  # (a shard may have no row)
    k = target_count(ratio, rows.shape[1], rounding)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=scores.device)
    block = max(1, CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], block):
        keys = _sortable(rows[start : start + block])
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
        mask[start : start + block].scatter_(1, order, True)
    return mask.view(scores.shape)


@dataclass
class Mask:
    """A bool tensor per parameter name: True marks the weights an edit may change (or, for pruning, remove).

    Entries may be FSDP2 shards (`DTensor`, as `top_k` gives for sharded scores); counts, summaries and
    `full_tensor` then communicate, so every process calls them."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, tensor in self.tensors.items():
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
        _check_ratio(ratio)
        if scope not in SCOPES:
            raise SafeEditError(f"unknown mask scope {scope!r}; choose one of: {', '.join(SCOPES)}")
        if rounding not in ROUNDINGS:
            raise SafeEditError(f"unknown mask rounding {rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
        if not scores:
            raise SafeEditError("no scores to select from; check the parameter patterns")
        for name, tensor in scores.items():
            if not torch.is_floating_point(tensor):
                raise SafeEditError(f"scores for {name!r} have dtype {tensor.dtype}; scores must be floating point")
        shards = Shards.of(scores)
        # chunked: no full-size temporary
        nan = [name for name, t in scores.items() if any(torch.isnan(c).any() for _, c in _chunks(local(t)))]
        if found_anywhere(nan, shards):
            where = f"scores for {nan[0]!r}" if nan else "scores on another process"
            raise SafeEditError(f"{where} contain NaN; check the model weights and the data")

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
        info = {"ratio": repr(float(ratio)), "scope": scope, **({"rounding": rounding} if rounding == "floor" else {}),
                **(metadata or {})}
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

    def save(self, path: str | os.PathLike) -> None:
        sharded = next((name for name, t in self.tensors.items() if is_sharded(t)), None)
        if sharded is not None:
            raise SafeEditError(
                f"mask entry {sharded!r} is sharded across processes; gather it with mask.full_tensor() on every "
                "process, then save from one (e.g. rank 0)"
            )
        metadata = {**self.metadata, "format": MASK_FORMAT, "selected": str(self.selected), "total": str(self.total)}
        save_safetensors(self.tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        tensors, metadata = load_safetensors(path)
        if metadata.get("format") != MASK_FORMAT:
            raise SafeEditError(f"{path}: not a safeedit mask (metadata format is {metadata.get('format')!r})")
        metadata = {k: v for k, v in metadata.items() if k not in ("format", "selected", "total")}
        return cls(tensors, metadata)

    def __repr__(self) -> str:
        info = json.dumps({k: self.metadata[k] for k in sorted(self.metadata)})
        return f"Mask({len(self.tensors)} tensors, {self.selected}/{self.total} selected, {info})"
