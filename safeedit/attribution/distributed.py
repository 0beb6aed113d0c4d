"""The distributed side of attribution: which batches this process takes, and the one reduction at the end.

Works with any process group `torch.distributed` knows (gloo on CPU, NCCL on GPU), whether it was started by
`torchrun`, `accelerate launch` or by hand. Without an initialised group everything is a no-op.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import DataLoader


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batches(loader: Iterable, rank: int, world: int) -> Iterable:
    """Round-robin batches over processes: process r takes batches r, r + world, r + 2·world, ...

    Every batch is seen by exactly one process and none is repeated, so sums over batches reduced across
    processes equal the single-process sums. A map-style DataLoader is re-wrapped with accelerate's
    `BatchSamplerShard` so skipped batches are never loaded; other iterables are sliced.
    """
    if world == 1:
        return loader
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        sampler = BatchSamplerShard(loader.batch_sampler, world, rank, split_batches=False, even_batches=False)
        return DataLoader(
            loader.dataset,
            batch_sampler=sampler,
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
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
