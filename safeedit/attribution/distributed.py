"""The distributed side of attribution: which batches this process takes, and when.

Works with any process group `torch.distributed` knows (gloo on CPU, NCCL on GPU), whether it was started by
`torchrun`, `accelerate launch` or by hand. Without an initialised group everything is a no-op. The reductions
themselves (`all_reduce_sum`) live in `safeedit.sharding`, with the FSDP2 shards.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from safeedit.errors import SafeEditError
from safeedit.sharding import all_reduce_sum

_END = object()


class EveryNthBatch(Sampler):
    """The batches of `batch_sampler` at positions rank, rank + world, rank + 2·world, ... (none dropped)."""

    def __init__(self, batch_sampler: Iterable, rank: int, world: int) -> None:
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.batch_sampler), self.rank, None, self.world)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.rank + self.world - 1) // self.world


def shard_batches(loader: Iterable, rank: int, world: int) -> Iterable:
    """Round-robin batches over processes: process r takes batches r, r + world, r + 2·world, ...

    Every batch is seen by exactly one process and none is repeated or dropped, so sums over batches reduced
    across processes equal the single-process sums. A map-style DataLoader gets a batch sampler that skips
    other processes' batches before loading them; other iterables (streaming data sets) are sliced.
    """
    if world == 1:
        return loader
    if (
        isinstance(loader, DataLoader)
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, IterableDataset)
    ):
        return DataLoader(
            loader.dataset,
            batch_sampler=EveryNthBatch(loader.batch_sampler, rank, world),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )
    return itertools.islice(loader, rank, None, world)


def lockstep(batches: Iterable, spare: Iterable) -> Iterator[tuple[Any, bool]]:
    """(batch, counts) pairs, as many on every process. FSDP gathers each layer's parameters in every forward, so
    no process may stop while another still has a batch: one whose batches ran out repeats its last (or, having
    had none, the first of `spare`) with counts=False, for the caller to weight 0. A one-number all-reduce per
    step tells when every process is done."""
    iterator, last = iter(batches), _END
    while True:
        batch = next(iterator, _END)
        active = torch.tensor([batch is not _END], dtype=torch.int64)
        all_reduce_sum([active])
        if not active.item():
            return
        if batch is not _END:
            last = batch
            yield batch, True
            continue
        if last is _END:
            last = next(iter(spare), _END)
        if last is _END:
            raise SafeEditError("this process has no batch while others have; give every process at least one batch")
        yield last, False
