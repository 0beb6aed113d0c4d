"""The one masked training loop every unlearning method runs."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from safeedit.batches import to_device
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.progress import bars_off
from safeedit.unlearn.masked import masked_training
from safeedit.unlearn.objectives import Objective


class TrainingOptions(BaseModel):
    """SGD with momentum, as in the SalUn reference; shared by every unlearning method."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=5, ge=1)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=64, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    optimizer: Literal["sgd", "adam"] = Field(default="sgd", description="adam: Adam(W) with betas (0.9, 0.999)")


def unlearn(
    model: nn.Module,
    objective: Objective,
    options: TrainingOptions,
    mask: Mask | None = None,
    progress: bool = True,
    description: str = "unlearning",
) -> nn.Module:
    """Run `objective` for `options.epochs` on a copy of `model`, changing only weights inside `mask`.

    Without a mask, every parameter that requires a gradient is trained: all of them for a plain model; for a peft
    model loaded from an adapter folder, the adapter alone (its base is frozen), so the edit stays an adapter.
    The input model is never modified. Gradients outside the mask are zeroed before clipping and masked-out
    weights are written back after every step (see `masked_training`); batch-norm statistics follow the
    forward passes in train mode, as in the reference implementations.
    """
    edited = copy.deepcopy(model)
    if mask is None:
        mask = Mask({name: torch.full(p.shape, p.requires_grad, dtype=torch.bool)
                     for name, p in edited.named_parameters()})
    device = next(edited.parameters()).device
    trainable = [p for p in edited.parameters() if p.is_floating_point()]
    if options.optimizer == "adam":
        optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    else:
        optimizer = torch.optim.SGD(trainable, lr=options.lr, momentum=options.momentum,
                                    weight_decay=options.weight_decay)
    edited.train()
    with masked_training(edited, mask.to(device), optimizer):
        epochs = tqdm(range(options.epochs), desc=description, unit="epoch", disable=bars_off(progress), leave=False)
        for epoch in epochs:
            for phase in objective(epoch):
                batches = tqdm(phase.loader, desc=f"{description}: {phase.name}", unit="batch",
                               disable=bars_off(progress), leave=False)
                for batch in batches:
                    optimizer.zero_grad(set_to_none=True)
                    loss = phase.loss(edited, to_device(batch, device))
                    if not torch.isfinite(loss):
                        raise SafeEditError(
                            f"{description}: the {phase.name} loss diverged to {loss.item()} in epoch {epoch}; "
                            "lower the learning rate"
                        )
                    loss.backward()
                    if options.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(edited.parameters(), options.grad_clip)
                    optimizer.step()
    return edited.eval()
