"""Antidote's calibration data: harmful (or benign) prompts answered by the fine-tuned model itself, so that the
activation statistics of the pruning score see the behaviour to remove (Huang et al. 2024, section 4)."""

from __future__ import annotations

from typing import Any

from torch import nn

from safeedit.data.chat import prompt_loader
from safeedit.data.prompts import ChatExample
from safeedit.eval.safety import generate_answers

# Prompts per calibration batch when the wanda statistics are read.
CALIBRATION_BATCH_SIZE = 16


def calibration_batches(model: nn.Module, tokenizer: Any, examples: list[ChatExample], max_new_tokens: int):
    """Chat-formatted calibration prompts followed by the model's own greedy answers: the behaviour to localize."""
    prompts = [e.prompt for e in examples]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
    return prompt_loader(tokenizer, prompts, CALIBRATION_BATCH_SIZE, answers=answers)
