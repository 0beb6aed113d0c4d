"""Train only the masked weights, with any torch optimizer, and leave every other weight bit-identical.

Two mechanisms, both installed as hooks so the training loop itself stays plain PyTorch:

1. A post-accumulate-grad hook on each masked parameter zeroes the masked-out entries of its gradient in place
   (its bits times the mask: exactly +0.0, no new tensor) as soon as backward has accumulated it into ``.grad``.
   Anything that reads gradients afterwards (gradient clipping, DDP's all-reduce, whose hook runs after this one,
   the optimizer) sees masked gradients only, so clipping is computed on the masked gradients alone. Gradients
   that never reach ``.grad`` (``torch.autograd.grad``) are not masked.
2. An optimizer step post-hook writes the masked-out entries back from a copy taken on entry, after every step
   that may have moved them. Zero gradients are not always enough: decoupled weight decay (AdamW), coupled weight
   decay fed into momentum (SGD) and any optimizer state left from earlier steps all move weights whose gradient is
   zero. Restoring after such steps makes "masked-out weights never change" a guarantee rather than a property of
   one optimizer. The write-back is skipped only where the step provably leaves the masked-out entries bit for bit
   (`leaves_zero_gradient_entries`: torch's Adam, AdamW or SGD with weight decay 0, whose state for the parameter
   was empty when the hook was installed, and whose gradients are the tensors this mask zeroed); it is checked again
   before every step, and a parameter that fails once is written back after every step from then on
   (``every_step=True`` asks for that from the start; needed when gradients are changed in place after backward
   other than by a positive finite factor). Only parameters that hold masked-out entries and that the
   optimizer holds are written back after its step (the others cannot have moved); every one is written back on
   exit. The copy is of each partially masked tensor's bits with its masked-in entries zeroed (the tensor's own
   size); the mask's tensors are used as given (not copied), so they must not change inside the block.

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
import math
import weakref
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
        every_step: bool = False,
    ) -> None:
        mask.check_matches(model)
        if buffers not in ("update", "freeze"):
            raise ValueError(f"buffers must be 'update' or 'freeze', got {buffers!r}")
        self.model = model
        params = dict(model.named_parameters())
        self._requires_grad = {name: p.requires_grad for name, p in params.items()}
        self._keep: dict[str, torch.Tensor] = {}  # the mask entry of each trainable parameter, laid out like it
        self._frozen_bits: dict[str, torch.Tensor] = {}  # the masked-out weights' bits, 0 where masked in
        self._masked_grads: dict[str, weakref.ref] = {}  # the gradient tensor each hook masked last
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
                self._handles.append(p.register_post_accumulate_grad_hook(self._gradient_mask(name, keep)))
        self._params = params
        self._buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if buffers == "freeze" else {}
        if optimizer is not None:
            self.restore_after_steps_of(optimizer, every_step)

    def restore_after_steps_of(self, optimizer: torch.optim.Optimizer, every_step: bool = False) -> None:
        """Write masked-out weights back after each ``optimizer.step()`` that may have moved them: those of the
        parameters the optimizer holds (its param groups as they are now), the only ones its step can move. Steps
        that provably leave them unchanged (see `leaves_zero_gradient_entries`) skip the write-back, unless
        `every_step`."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [name for name in self._frozen_bits if id(self._params[name]) in held]
        restorer = _StepRestorer(self, optimizer, names, every_step)
        self._handles += [optimizer.register_step_pre_hook(restorer.before_step),
                          optimizer.register_step_post_hook(restorer.after_step)]

    def _gradient_mask(self, name: str, keep: torch.Tensor):
        """The post-accumulate-grad hook of parameter `name`: +0.0 where masked out, in place; it remembers the
        gradient tensor it masked (weakly), so that a gradient assigned some other way is not taken for masked."""

        @torch.no_grad()
        def hook(param: torch.Tensor) -> None:
            bits(local(param.grad)).mul_(keep)
            self._masked_grads[name] = weakref.ref(param.grad)

        return hook

    def _gradient_is_masked(self, name: str, grad: torch.Tensor) -> bool:
        """Whether `grad` is the tensor the hook of `name` last masked (not one assigned to ``.grad`` since)."""
        masked = self._masked_grads.get(name)
        return masked is not None and masked() is grad

    @torch.no_grad()
    def restore(self, names: Iterable[str] | None = None) -> None:
        """Write the masked-out weights (of `names`, default all) and frozen buffers back to their values on entry:
        bit for bit, the saved masked-out bits plus the weight's bits times the mask, in one pass (exact integer
        operations: one of the two terms is 0 in every entry; several times faster on CPU than a boolean-indexed
        scatter)."""
        for name in self._frozen_bits if names is None else names:
            weight = bits(local(self._params[name]))
            torch.addcmul(self._frozen_bits[name], weight, self._keep[name], out=weight)
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


class _StepRestorer:
    """The step hooks of one optimizer: before each step, which masked-out weights it may move; after it, those
    written back (with the frozen buffers)."""

    def __init__(self, session: MaskedTraining, optimizer: torch.optim.Optimizer, names: list[str],
                 every_step: bool) -> None:
        self._session = session
        self._state = optimizer.state
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._restored: list[str] = []  # written back after every step
        self._unmoved: dict[str, dict] = {}  # not written back while their group's steps provably leave them
        for name in names:
            param, group = session._params[name], group_of[id(session._params[name])]
            if (every_step or optimizer.state.get(param) or local(param).device.type != "cpu"
                    or not leaves_zero_gradient_entries(optimizer, group)):
                self._restored.append(name)
            else:
                self._unmoved[name] = group

    def before_step(self, optimizer: torch.optim.Optimizer, *_) -> None:
        """Move to the written-back list every parameter this step may move: its group's settings changed, its
        gradient is not the one the mask zeroed, or the optimizer's state was replaced (``load_state_dict``)."""
        if not self._unmoved:
            return
        replaced = optimizer.state is not self._state
        params = self._session._params
        for name, group in list(self._unmoved.items()):
            grad = params[name].grad
            if replaced or (grad is not None and not (
                    self._session._gradient_is_masked(name, grad) and leaves_zero_gradient_entries(optimizer, group))):
                del self._unmoved[name]
                self._restored.append(name)

    def after_step(self, *_) -> None:
        self._session.restore(self._restored)


_EXACT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def leaves_zero_gradient_entries(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether a step of `optimizer` with `group`'s settings leaves bit for bit every entry whose gradient has been
    +0.0 at every step since the parameter's state was empty (a quiet-NaN, infinite or signed-zero weight included).

    Applied to parameters on the CPU only: the argument below holds for any IEEE kernel, but the CUDA kernels have
    not been run under the bit-for-bit tests here (no GPU), so there the write-back stays after every step.

    True for torch's own Adam, AdamW and SGD (not subclasses; single-tensor, foreach and fused paths, amsgrad,
    nesterov, capturable) with weight decay 0, a finite learning rate > 0, plain-number settings, not
    differentiable, and: Adam(W) with betas in [0, 1) and a finite eps > 0; SGD with a finite momentum >= 0 and a
    finite dampening. Why: the first moment (momentum buffer) starts as +0.0 and stays +0.0 (products and sums of
    +0.0 with +0.0 or -0.0 are +0.0), the second moment too, so Adam's denominator is eps > 0 and its update is
    -step_size * (+0.0 / eps) = -0.0; SGD's is -lr * +0.0 = -0.0; a weight plus -0.0 is the weight itself, -0.0,
    infinities and quiet NaNs included (a signalling NaN would come back quiet; torch never makes one). Excluded:
    weight decay (it adds the weight to the update); SGD's maximize (the gradient negated to -0.0 makes the update
    +0.0, which turns a -0.0 weight into +0.0), and Adam's maximize with beta1 = 0 (the vectorised lerp then gives
    a -0.0 first moment); other optimizers (not analysed)."""
    if type(optimizer) not in _EXACT_OPTIMIZERS or group.get("differentiable", False):
        return False
    if not (_finite_at_least(group.get("weight_decay"), 0.0) and group["weight_decay"] == 0
            and _finite_at_least(group.get("lr"), 0.0) and group["lr"] > 0):
        return False
    if isinstance(optimizer, torch.optim.SGD):
        return not group.get("maximize", False) and _finite_at_least(group.get("momentum"), 0.0) \
            and _finite_at_least(group.get("dampening"), -math.inf)
    betas = group.get("betas")
    return isinstance(betas, tuple | list) and len(betas) == 2 \
        and all(_finite_at_least(beta, 0.0) and beta < 1 for beta in betas) \
        and not (group.get("maximize", False) and betas[0] == 0) \
        and _finite_at_least(group.get("eps"), 0.0) and group["eps"] > 0


def _finite_at_least(value: object, low: float) -> bool:
    """Whether `value` is a plain number (not a tensor), finite and >= `low`."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= low


@contextlib.contextmanager
def masked_training(
    model: nn.Module,
    mask: Mask,
    optimizer: torch.optim.Optimizer | None = None,
    buffers: Literal["update", "freeze"] = "update",
    every_step: bool = False,
) -> Iterator[MaskedTraining]:
    """Within this block, only weights where `mask` is True can change, whatever the optimizer does.

    ``optimizer`` gets step hooks that restore masked-out weights after each ``step()`` that may have moved them
    (`every_step`: after each one; pass it when something changes gradients in place between backward and the
    step other than by a positive finite factor, as clipping does, e.g. adds noise); with an optimizer created
    inside the block, call ``.restore_after_steps_of(optimizer)``, or ``.restore()`` yourself after each step. On
    exit the hooks are removed, masked-out weights are restored a last time and ``requires_grad`` flags are put back.

        with masked_training(model, mask, optimizer) as masked:
            loss.backward()                     # masked-out gradient entries are already zero here
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()                    # masked-out weights written back right after, if it can move them
    """
    session = MaskedTraining(model, mask, optimizer, buffers, every_step)
    try:
        yield session
    finally:
        session.close()
