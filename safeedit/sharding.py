"""Processes and the tensors they shard: the one reduction safeedit uses, and the few operations scores, masks
and masked training need on tensors sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`).

`fully_shard` turns every parameter into a `DTensor` split along dim 0 over a 1-D device mesh (placement
`Shard(0)`): the process at mesh position i holds rows [i·c, (i + 1)·c) with c = ceil(rows / world), as
`torch.chunk` splits (the last shards may be short or empty). Whole rows are local, and the flat row-major order
of a tensor is its local shards concatenated in mesh order: that is what lets a sharded mask selection keep the
single-process tie rule. Scores and mask selection refuse other layouts (HSDP's 2-D meshes, `Shard(1)`,
`Replicate`), naming the tensor and its layout. `DTensor` arithmetic covers the rest; these helpers add what it
lacks: counts that are global (`int()` of a `DTensor` reduction reads the local part only), cutting a whole
tensor to a shard's layout without communication, and the process group of a set of shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from safeedit.errors import SafeEditError


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_processes() -> int:
    """How many processes `torchrun` / `accelerate launch` started (their WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment, if any (NCCL on
    CUDA, each process on the GPU of its LOCAL_RANK; gloo on CPU). Yields whether this process writes outputs (rank
    0, or the only process)."""
    if launched_processes() == 1 or dist.is_initialized():
        yield not dist.is_initialized() or dist.get_rank() == 0
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank() == 0
    finally:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensors: Iterable[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Sum tensors in place across the processes of `group` (default: all; no-op in a single process)."""
    if rank_and_world()[1] == 1:
        return
    needs_cuda = dist.get_backend(group) == "nccl"  # NCCL reduces CUDA tensors only (CPU-offloaded states, counters)
    for tensor in tensors:
        if needs_cuda and not tensor.is_cuda:
            staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a `DTensor` (sharing its storage under `torch.no_grad`); a plain tensor as is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process (a collective); a plain tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def wrap_like(shard: torch.Tensor, reference: DTensor) -> DTensor:
    """A `DTensor` with `reference`'s shape and layout whose local shard is `shard` (no communication)."""
    return DTensor.from_local(
        shard, reference.device_mesh, reference.placements, run_check=False, shape=reference.shape,
        stride=reference.stride(),
    )


def replicate_like(whole: torch.Tensor, reference: DTensor) -> DTensor:
    """`whole`, identical on every process, as a replicated `DTensor` on `reference`'s mesh (no communication)."""
    mesh = reference.device_mesh
    return DTensor.from_local(whole.to(local(reference).device), mesh, [Replicate()] * mesh.ndim, run_check=False)


def shard_like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole tensor, identical on every process, cut to `reference`'s layout by local slicing (no
    communication); unchanged when `reference` is a plain tensor or `whole` is already sharded."""
    if not is_sharded(reference) or is_sharded(whole):
        return whole
    sliced = replicate_like(whole, reference).redistribute(reference.device_mesh, reference.placements)
    return wrap_like(local(sliced).clone(), reference)  # clone: the slice would keep the whole tensor alive


def count_nonzero(tensor: torch.Tensor) -> int:
    """Non-zero entries of the whole tensor (for a `DTensor`: summed over the shards, a collective)."""
    return int(gathered(torch.count_nonzero(tensor)))


@dataclass(frozen=True)
class Shards:
    """The process group that holds a set of `Shard(0)` tensors, and this process's position (`index`) in it."""

    group: dist.ProcessGroup
    index: int
    world: int

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Shards | None:
        """The shards' group; None when no tensor is a `DTensor`. Raises unless all are `Shard(0)` on one 1-D mesh."""
        sharded = {name: t for name, t in tensors.items() if is_sharded(t)}
        if not sharded:
            return None
        plain = next((name for name in tensors if name not in sharded), None)
        if plain is not None:
            raise SafeEditError(
                f"{plain!r} is a plain tensor while others are FSDP shards (DTensor); shard every parameter "
                "(apply fully_shard to the root module too)"
            )
        name, first = next(iter(sharded.items()))
        for other, tensor in sharded.items():
            if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
                raise SafeEditError(
                    f"{other!r} is sharded as {tensor.placements} on a {tensor.device_mesh.ndim}-D mesh; safeedit "
                    "supports FSDP2's default layout, Shard(0) on a 1-D mesh (no HSDP, no shard_placement_fn)"
                )
            if tensor.device_mesh != first.device_mesh:
                raise SafeEditError(f"{other!r} and {name!r} are sharded over different device meshes; use one")
        mesh = first.device_mesh
        return cls(mesh.get_group(), mesh.get_local_rank(), mesh.size())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the group, in place."""
        all_reduce_sum([tensor], self.group)
        return tensor


def found_anywhere(found: list, shards: Shards | None) -> bool:
    """Whether `found` is non-empty here or, with `shards`, on any process of their group: every process asks
    (a collective), so all of them raise together instead of one leaving the others waiting."""
    if shards is None:
        return bool(found)
    return bool(shards.sum(torch.tensor([len(found)], dtype=torch.int64)).item())
