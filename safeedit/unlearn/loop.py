"""The one masked training loop every unlearning method runs."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from safeedit.batches import to_device
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.progress import bars_off
from safeedit.sharding import is_sharded, local
from safeedit.unlearn.masked import masked_training
from safeedit.unlearn.objectives import Objective, Phase


class TrainingOptions(BaseModel):
    """SGD with momentum, as in the SalUn reference; shared by every unlearning method. The last three options are
    for large models; their defaults leave the loop as it always was."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=5, ge=1)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=64, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    optimizer: Literal["sgd", "adam", "adamw_fused"] = Field(
        default="sgd", description="adam: AdamW with betas (0.9, 0.999); adamw_fused: the same with torch's fused "
                                   "kernel where it has one (LLM unlearning)")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="micro-batches per optimizer step, each loss scaled by 1/(micro-batches in the "
                                     "step); a phase's last step takes the micro-batches left")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in backward (Hugging Face models' "
                                   "gradient_checkpointing_enable, non-reentrant): less memory, about one more forward")
    mixed_precision: Literal["no", "bf16"] = Field(
        default="no", description="bf16: forward passes under torch.autocast(bfloat16) on the model's device; "
                                  "weights, gradients and optimizer state stay in the model's dtype")


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
FUSED_ADAMW_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW; with `fused`, torch's fused kernel where it has one (every parameter on the CPU or CUDA in a float
    dtype; the default of Hugging Face's Trainer, `adamw_torch_fused`), else the default kernel. Measured on this
    project's CPU (27M entries, one thread): a step takes 33 ms fused against 166 ms, and the default kernel slows
    to 306 ms when half the second moments are exactly zero, as they stay for masked-out entries (torch's CPU sqrt
    is about 4x slower on zeros), while the fused one does not. The kernels agree to the last bits, not bit for bit,
    so the fine-tunes that build settings (cached) keep the default kernel and LLM unlearning takes the fused one."""
    fused = fused and bool(params) and all(
        local(p).device.type in FUSED_ADAMW_DEVICES and p.dtype in FUSED_ADAMW_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def unlearn(
    model: nn.Module,
    objective: Objective,
    options: TrainingOptions,
    mask: Mask | None = None,
    progress: bool = True,
    description: str = "unlearning",
    in_place: bool = False,
) -> nn.Module:
    """Run `objective` for `options.epochs` on a copy of `model` (`in_place`: on `model` itself), changing only
    weights inside `mask`.

    The model runs in train mode; an optimizer step reads `options.gradient_accumulation_steps` batches; with
    `options.mixed_precision` "bf16" forward passes run under autocast; `options.gradient_checkpointing` switches
    Hugging Face gradient checkpointing on for the run.

    Without a mask, every parameter that requires a gradient is trained: all of them for a plain model; for a peft
    model loaded from an adapter folder, the adapter alone (its base is frozen), so the edit stays an adapter.
    Unless `in_place`, the input model is never modified; `in_place` saves the copy (needed for a model sharded by
    FSDP2, which cannot be deep-copied): every process of the group runs the same call, each on its own batches or
    the same ones. Gradients outside the mask are zeroed before clipping and masked-out weights are written back
    after every step that may move them (with weight decay; without, SGD and AdamW provably leave them bit for bit)
    and once at the end (see `masked_training`); the optimizer holds only parameters with a masked-in entry, so no
    optimizer state exists for the others. If the run fails in place, the masked-in weights are left as they
    were then (masked-out ones are restored). Batch-norm statistics follow the forward passes in train mode, as in the
    reference implementations.
    """
    sharded = any(is_sharded(p) for p in model.parameters())
    if sharded and not in_place:
        raise SafeEditError(f"{description}: the model is sharded by FSDP2 and cannot be copied; pass in_place=True "
                            "(the model itself is edited) or unlearn an unsharded model")
    edited = model if in_place else copy.deepcopy(model)
    if mask is None:
        mask = Mask({name: torch.full(p.shape, p.requires_grad, dtype=torch.bool)
                     for name, p in edited.named_parameters()})
    device = next(edited.parameters()).device
    edited.train()
    with checkpointing(edited, options.gradient_checkpointing, description), \
            masked_training(edited, mask.to(device)) as masked:
        trainable = masked.trainable_parameters
        if options.optimizer in ("adam", "adamw_fused"):
            optimizer = adamw(trainable, options.lr, options.weight_decay, fused=options.optimizer == "adamw_fused")
        else:
            optimizer = torch.optim.SGD(trainable, lr=options.lr, momentum=options.momentum,
                                        weight_decay=options.weight_decay)
        masked.restore_after_steps_of(optimizer)
        epochs = tqdm(range(options.epochs), desc=description, unit="epoch", disable=bars_off(progress), leave=False)
        for epoch in epochs:
            for phase in objective(epoch):
                batches = tqdm(phase.loader, desc=f"{description}: {phase.name}", unit="batch",
                               disable=bars_off(progress), leave=False)
                for step in steps(batches, options.gradient_accumulation_steps):
                    optimizer.zero_grad(set_to_none=True)
                    for index, batch in enumerate(step):
                        with gradient_sync(edited, sharded and index < len(step) - 1):
                            loss = micro_batch_loss(edited, phase, batch, device, options.mixed_precision)
                            if not torch.isfinite(loss):
                                raise SafeEditError(
                                    f"{description}: the {phase.name} loss diverged to {loss.item()} in epoch "
                                    f"{epoch}; lower the learning rate"
                                )
                            (loss / len(step) if len(step) > 1 else loss).backward()
                    if options.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(edited.parameters(), options.grad_clip)
                    optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # (in place: no gradient is left on the caller's model)
    return edited.eval()


def steps(batches: Iterable, size: int) -> Iterator[list]:
    """The batches in groups of `size` (the last group may be smaller): the micro-batches of each optimizer step."""
    iterator = iter(batches)
    while step := list(itertools.islice(iterator, size)):
        yield step


def micro_batch_loss(model: nn.Module, phase: Phase, batch: Any, device: torch.device,
                     mixed_precision: str) -> torch.Tensor:
    """The phase's loss on one batch, its forward under bf16 autocast when asked."""
    batch = to_device(batch, device)
    if mixed_precision == "no":
        return phase.loss(model, batch)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        return phase.loss(model, batch)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """With `skip` (an FSDP2 model, not a step's last micro-batch), no reduce-scatter in this backward: the gradient
    accumulates unsharded until the step's last micro-batch reduces it once."""
    if not skip or not callable(getattr(model, "set_requires_gradient_sync", None)):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def checkpointing(model: nn.Module, enable: bool, description: str) -> Iterator[None]:
    """Hugging Face gradient checkpointing (non-reentrant) within the block, switched off again on exit if it was
    off before. transformers 5 names it activation checkpointing; 4.x, gradient checkpointing."""
    if not enable:
        yield
        return
    name = "activation" if callable(getattr(model, "activation_checkpointing_enable", None)) else "gradient"
    if not callable(getattr(model, f"{name}_checkpointing_enable", None)) or not getattr(
            model, "supports_gradient_checkpointing", False):
        raise SafeEditError(
            f"{description}: gradient_checkpointing needs a Hugging Face transformers model that supports it "
            f"(gradient_checkpointing_enable); {type(model).__name__} does not; set gradient_checkpointing: false"
        )
    was_on = bool(getattr(model, f"is_{name}_checkpointing", False))
    getattr(model, f"{name}_checkpointing_enable")(**{f"{name}_checkpointing_kwargs": {"use_reentrant": False}})
    try:
        yield
    finally:
        if not was_on:
            getattr(model, f"{name}_checkpointing_disable")()
