"""Train only the masked weights, with any torch optimizer, and leave every other weight bit-identical.

Two mechanisms, both installed as hooks so the training loop itself stays plain PyTorch:

1. A post-accumulate-grad hook on each masked parameter zeroes the masked-out entries of its gradient in place
   (its bits times the mask: exactly +0.0, no new tensor) as soon as backward has accumulated it into ``.grad``.
   Anything that reads gradients afterwards (gradient clipping, DDP's all-reduce, whose hook runs after this one,
   the optimizer) sees masked gradients only, so clipping is computed on the masked gradients alone. Gradients
   that never reach ``.grad`` (``torch.autograd.grad``) are not masked.
2. An optimizer step post-hook writes the masked-out entries back from a copy taken on entry. Zero gradients
   are not enough: decoupled weight decay (AdamW), coupled weight decay fed into momentum (SGD) and any
   optimizer state left from earlier steps all move weights whose gradient is zero. Restoring after every step
   makes "masked-out weights never change" a guarantee rather than a property of one optimizer. Only parameters
   that hold masked-out entries and that the optimizer holds are written back after its step (the others cannot
   have moved); every one is written back on exit. The copy is of each partially masked tensor's bits with its
   masked-in entries zeroed (the tensor's own size); the mask's tensors are used as given (not copied), so they
   must not change inside the block.

Parameters with no mask entry are frozen (requires_grad=False while the context is active; torch optimizers
skip parameters without gradients). Buffers, such as batch-norm running statistics, are not weights and are
not covered by the mask: with ``buffers="update"`` (the default, as in SalUn's reference training) the forward
pass in train mode updates them; ``buffers="freeze"`` restores every buffer (counters included) after each step and
on exit, for edits that must not touch anything outside the mask. Element-wise optimizers (SGD, Adam, AdamW,
RMSprop, Adagrad...) leave the masked-in updates exactly as they would be without the mask.

A model sharded by FSDP2 (`fully_shard`, parameters as `DTensor`s) is masked shard by shard: the mask may be
whole (each process cuts its rows out, without communication) or sharded like the parameters (as `Mask.top_k`
gives for sharded scores). FSDP assigns the reduce-scattered gradient to the sharded parameter instead of
running its tensor hooks; the post-accumulate hook, which FSDP does run, masks it there too, before clipping and
the optimizer read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.sharding import count_nonzero, is_sharded, local, shard_like


class MaskedTraining:
    """The installed hooks and the saved masked-out values; use through `masked_training`."""

    def __init__(
        self,
        model: nn.Module,
        mask: Mask,
        optimizer: torch.optim.Optimizer | None = None,
        buffers: Literal["update", "freeze"] = "update",
    ) -> None:
        mask.check_matches(model)
        if buffers not in ("update", "freeze"):
            raise ValueError(f"buffers must be 'update' or 'freeze', got {buffers!r}")
        self.model = model
        params = dict(model.named_parameters())
        self._requires_grad = {name: p.requires_grad for name, p in params.items()}
        self._keep: dict[str, torch.Tensor] = {}  # the mask entry of each trainable parameter, laid out like it
        self._frozen_bits: dict[str, torch.Tensor] = {}  # the masked-out weights' bits, 0 where masked in
        self._handles: list = []
        for name, p in params.items():
            p.grad = None  # gradients from before the block would bypass the mask
            keep = mask.tensors.get(name)
            if keep is None or count_nonzero(keep) == 0:
                p.requires_grad_(False)
                continue
            p.requires_grad_(True)
            keep = local(_laid_out_like(name, keep, p)).to(local(p).device)
            self._keep[name] = keep
            if not keep.all():
                self._frozen_bits[name] = bits(local(p).detach()).clone().masked_fill_(keep, 0)
                self._handles.append(p.register_post_accumulate_grad_hook(_zero_masked_out_of_grad(keep)))
        self._params = params
        self._buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if buffers == "freeze" else {}
        if optimizer is not None:
            self.restore_after_steps_of(optimizer)

    def restore_after_steps_of(self, optimizer: torch.optim.Optimizer) -> None:
        """Write masked-out weights back after every ``optimizer.step()``: those of the parameters the optimizer
        holds (its param groups as they are now), the only ones its step can move."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [name for name in self._frozen_bits if id(self._params[name]) in held]
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore(names)))

    @torch.no_grad()
    def restore(self, names: Iterable[str] | None = None) -> None:
        """Write the masked-out weights (of `names`, default all) and frozen buffers back to their values on entry:
        bit for bit, the weight's bits times the mask, or-ed with the saved masked-out bits (exact integer
        operations, and several times faster on CPU than a boolean-indexed scatter)."""
        for name in self._frozen_bits if names is None else names:
            bits(local(self._params[name])).mul_(self._keep[name]).bitwise_or_(self._frozen_bits[name])
        if self._buffers:
            live = dict(self.model.named_buffers())
            for name, value in self._buffers.items():
                live[name].copy_(value)

    def close(self) -> None:
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, p in self._params.items():
            p.requires_grad_(self._requires_grad[name])

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters with at least one masked-in entry: pass these to the optimizer."""
        return [self._params[name] for name in self._keep]


def _laid_out_like(name: str, keep: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The mask entry sharded like its parameter: a whole entry of a sharded parameter is cut to its shard."""
    if is_sharded(keep) and (not is_sharded(param) or keep.placements != param.placements):
        raise SafeEditError(
            f"mask entry {name!r} is sharded as {keep.placements} but its parameter is "
            f"{getattr(param, 'placements', 'whole')}; pass mask.full_tensor() (or the mask sharded like the model)"
        )
    return shard_like(keep, param)


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage seen as integers of its element size (no copy): masking them with integer arithmetic
    is exact whatever the values (NaN and infinities included) and takes the fast vectorised kernels."""
    return tensor.view(_INTEGER_OF_SIZE[tensor.element_size()])


def _zero_masked_out_of_grad(keep: torch.Tensor):
    @torch.no_grad()
    def hook(param: torch.Tensor) -> None:
        bits(local(param.grad)).mul_(keep)  # +0.0 where masked out, in place

    return hook


@contextlib.contextmanager
def masked_training(
    model: nn.Module,
    mask: Mask,
    optimizer: torch.optim.Optimizer | None = None,
    buffers: Literal["update", "freeze"] = "update",
) -> Iterator[MaskedTraining]:
    """Within this block, only weights where `mask` is True can change, whatever the optimizer does.

    ``optimizer`` gets a step post-hook that restores masked-out weights after each ``step()``; without one,
    call ``.restore()`` yourself after each step. On exit the hooks are removed, masked-out weights are
    restored a last time and ``requires_grad`` flags are put back.

        with masked_training(model, mask, optimizer) as masked:
            loss.backward()                     # masked-out gradient entries are already zero here
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()                    # masked-out weights written back right after
    """
    session = MaskedTraining(model, mask, optimizer, buffers)
    try:
        yield session
    finally:
        session.close()
