"""The distributed side of attribution: which batches this process takes, and the one reduction at the end.

Works with any process group `torch.distributed` knows (gloo on CPU, NCCL on GPU), whether it was started by
`torchrun`, `accelerate launch` or by hand. Without an initialised group everything is a no-op.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum tensors in place across processes (no-op in a single process)."""
    if rank_and_world()[1] == 1:
        return
    needs_cuda = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only (CPU-offloaded states, counters)
    for tensor in tensors:
        if needs_cuda and not tensor.is_cuda:
            staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
