"""Whole models under FSDP2 for the scenario runner: shard a loaded model as `accelerate` does by default (each
block its class names in `_no_split_modules`, then the root), make a fresh sharded copy of it for each method to edit
in place (a sharded model cannot be deep-copied), and gather an edited model whole on the first process to write it.

Every function here is a collective: every process calls it, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from safeedit.errors import SafeEditError
from safeedit.sharding import local


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: those whose class a Hugging Face model names in `_no_split_modules` (its
    decoder layers), in module order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [module for module in model.modules() if type(module).__name__ in names]
    if not found:
        raise SafeEditError(f"{type(model).__name__} names no blocks to shard (_no_split_modules); a Hugging Face "
                            "causal LM of a supported architecture is needed to run sharded")
    return found


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` sharded in place over every process (each block, then the root), its shards on `device`: the layout
    safeedit's sharded scores, masks and training expect (`Shard(0)` on a 1-D mesh)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)  # (the root's default keeps its weights whole after
    return model                                                # a forward: every reader here expects shards)


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (FSDP2 swaps in a subclass named `FSDP<class>`)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def meta_model(model: nn.Module) -> nn.Module:
    """An empty model (meta device) of `model`'s class, config and dtype."""
    with torch.device("meta"):
        empty = unsharded_class(model)(model.config)
    return empty.to(next(model.parameters()).dtype)


def sharded_copy(model: nn.Module) -> nn.Module:
    """A second model sharded like `model` with the same values: built on the meta device from its config, sharded,
    then each process copies its own shards and the (unsharded) buffers. No process holds the whole model."""
    device = local(next(model.parameters())).device
    copy = meta_model(model)
    shard_model(copy, device)
    copy.to_empty(device=device)
    with torch.no_grad():
        sources = dict(model.named_parameters())
        for name, target in copy.named_parameters():
            local(target).copy_(local(sources[name]))
        sources = dict(model.named_buffers())
        for name, buffer in copy.named_buffers():
            buffer.copy_(sources[name])
    copy.train(model.training)
    return copy


def gathered_model(model: nn.Module) -> nn.Module | None:
    """`model` whole, as its own class on the CPU, on the first process (None on the others): what is written."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    whole = meta_model(model)
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()
    buffers = dict(model.named_buffers())  # not sharded: every process holds them whole
    for name, _ in list(whole.named_buffers()):
        module, _, leaf = name.rpartition(".")
        whole.get_submodule(module)._buffers[leaf] = buffers[name].detach().cpu().clone()
    return whole.eval()
