"""WAGLE (Jia et al., NeurIPS 2024): weight attribution-guided LLM unlearning, as its algorithm box reads.

1. Attribution: g_f, the summed gradient of the forget NLL, and g_r, of the NLL on one paired retain example per
   forget example; s = |(θ − g_r/γ) ⊙ g_f| (the `wagle` score of the attribution core).
2. Mask: the globally top-r weights by s.
3. Unlearning: any LLM objective (GradDiff, NPO, refusal) with its retain term, updating only masked weights.

A method is named `<objective>+<score>` (`npo+wagle`, `graddiff+random`, ...) or `<objective>` alone (dense: every
weight may change), so the mask ablation is one name: `wagle`, `saliency`, `magnitude` and `random` masks all take
the same ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from safeedit.attribution.select import score_mask
from safeedit.data.chat import chat_loader
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.unlearn.lm_objectives import LM_OBJECTIVES, LMUnlearnData, check_forget_retain, paired_retain
from safeedit.unlearn.loop import TrainingOptions, unlearn

MASK_SCORES = ("wagle", "saliency", "magnitude", "random")


class LMUnlearnOptions(BaseModel):
    """AdamW on the paired forget/retain batches; the mask options apply when the method names a score."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=5, ge=1, description="passes over the forget set")
    lr: float = Field(default=1e-5, gt=0)
    batch_size: int = Field(default=4, ge=1, description="forget examples per step (and as many retain examples)")
    max_length: int = Field(default=160, ge=8)
    grad_clip: float | None = Field(default=1.0, gt=0)
    retain_weight: float = Field(default=1.0, ge=0, description="γ_r, the weight of the retain NLL")
    beta: float = Field(default=0.1, gt=0, description="NPO's inverse temperature")
    mask_ratio: float = Field(default=0.2, gt=0, le=1, description="share of weights the masked methods edit")
    gamma: float = Field(default=1.0, gt=0, description="WAGLE's Hessian-diagonal constant γ")


def parse_method(name: str) -> tuple[str, str | None]:
    """`npo+wagle` -> ("npo", "wagle"); `npo` -> ("npo", None)."""
    objective, _, score = name.partition("+")
    if objective not in LM_OBJECTIVES:
        raise SafeEditError(f"unknown LLM unlearning method {name!r}: the objective must be one of "
                            f"{', '.join(LM_OBJECTIVES)} (optionally +{'|+'.join(MASK_SCORES)})")
    if score and score not in MASK_SCORES:
        raise SafeEditError(f"unknown mask {score!r} in {name!r}; choose one of {', '.join(MASK_SCORES)} "
                            f"or name the objective alone for no mask")
    return objective, score or None


def lm_mask(model: nn.Module, score: str, data: LMUnlearnData, options: LMUnlearnOptions,
            progress: bool = True) -> Mask:
    """Steps 1-2: the top-r weights by `score`, read from the forget set and its paired retain examples."""
    tokenizer, size, length = data.tokenizer, data.batch_size, data.max_length
    roles = {"forget": chat_loader(tokenizer, data.forget, size, length),
             "retain": chat_loader(tokenizer, paired_retain(data.forget, data.retain, data.seed), size, length)}
    score_options = {"wagle": {"gamma": options.gamma}, "random": {"seed": data.seed}}.get(score)
    return score_mask(model, score, roles, options.mask_ratio, options=score_options, progress=progress)


def lm_unlearn(model: nn.Module, tokenizer: Any, forget: Sequence[ChatExample], retain: Sequence[ChatExample],
               method: str, options: LMUnlearnOptions, seed: int = 0,
               progress: bool = True) -> tuple[nn.Module, Mask | None]:
    """The unlearned copy of `model` (the input is the frozen reference and is not modified) and its mask."""
    check_forget_retain(forget, retain)
    objective_name, score = parse_method(method)
    data = LMUnlearnData(tokenizer, forget, retain, options.batch_size, options.max_length, seed)
    mask = lm_mask(model, score, data, options, progress) if score else None
    objective = LM_OBJECTIVES[objective_name](data, model, options.retain_weight, options.beta)
    training = TrainingOptions(epochs=options.epochs, lr=options.lr, weight_decay=0.0, batch_size=options.batch_size,
                               grad_clip=options.grad_clip, optimizer="adam")
    torch.manual_seed(seed)  # dropout, where the architecture has it: the same seed repeats the same run
    return unlearn(model, objective, training, mask, progress, method), mask
