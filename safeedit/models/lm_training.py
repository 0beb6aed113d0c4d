"""Supervised fine-tuning of a chat model on prompt/answer pairs, full or through a LoRA adapter (`peft`).

Both run through safeedit's one masked training loop (`unlearn.loop.unlearn`): for LoRA the mask selects the
adapter factors only, so the base weights provably stay bit-identical until the adapter is merged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from safeedit.batches import default_loss
from safeedit.data.chat import chat_loader
from safeedit.data.prompts import ChatExample
from safeedit.masks import Mask
from safeedit.unlearn.loop import TrainingOptions, unlearn
from safeedit.unlearn.objectives import Phase

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneOptions(BaseModel):
    """AdamW on the answer tokens; `lora_rank: 0` fine-tunes every weight instead of an adapter."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=160, ge=8)
    lora_rank: int = Field(default=16, ge=0)
    lora_alpha: float = Field(default=32, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    merge: bool = Field(default=True, description="merge the adapter into the weights after training")


def lora_mask(model: nn.Module) -> Mask:
    """True on every LoRA factor, False elsewhere."""
    return Mask({name: torch.full(p.shape, "lora_" in name, dtype=torch.bool)
                 for name, p in model.named_parameters()})


def with_lora(model: nn.Module, options: FinetuneOptions) -> PeftModel:
    """A copy of `model` wrapped with a fresh LoRA adapter (B = 0, so it computes the same function)."""
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=0.0,
                        target_modules=options.lora_targets, bias="none")
    return get_peft_model(copy.deepcopy(model), config)


def finetune_chat(model: nn.Module, tokenizer: Any, examples: Sequence[ChatExample], options: FinetuneOptions,
                  seed: int = 0, progress: bool = True, description: str = "fine-tuning") -> nn.Module:
    """A fine-tuned copy of `model` (the input is not modified); with LoRA and `merge`, a plain merged model."""
    torch.manual_seed(seed)
    loader = chat_loader(tokenizer, examples, options.batch_size, options.max_length, shuffle=True, seed=seed)
    training = TrainingOptions(epochs=options.epochs, lr=options.lr, weight_decay=0.0,
                               batch_size=options.batch_size, grad_clip=1.0, optimizer="adam")
    trainee = with_lora(model, options) if options.lora_rank else model
    mask = lora_mask(trainee) if options.lora_rank else None
    tuned = unlearn(trainee, lambda epoch: [Phase("train", loader, default_loss)], training, mask,
                    progress=progress, description=description)
    if options.lora_rank and options.merge:
        tuned = tuned.merge_and_unload()
    return tuned.eval()
