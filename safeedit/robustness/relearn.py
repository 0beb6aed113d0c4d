"""Relearning attacks: fine-tune an edited model for a few steps on data an attacker could hold, and measure
forgetting again along the way (Hu et al. 2024, "Jogging the memory of unlearned LLMs through targeted relearning
attacks", arXiv 2406.13356; Lynch et al. 2024's retraining-on-T evaluation). The retrained reference is attacked
the same way: it relearns too, and its curve is the honest baseline."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RelearnSet:
    """Data an attacker fine-tunes on: what it is in words, how many examples, and a fresh iterator over its
    batches in a fixed order (cycled when the steps outnumber them)."""

    about: str
    examples: int
    batches: Callable[[], Iterator[Any]]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every floating-point parameter, made trainable: the attacker fine-tunes the whole model."""
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def relearn_curve(model: Any, data: RelearnSet, loss: Callable[[Any, Any], torch.Tensor],
                  measure: Callable[[Any], dict[str, float]], steps: Sequence[int], lr: float, seed: int,
                  network: Callable[[Any], nn.Module] = lambda m: m,
                  at_start: dict[str, float] | None = None) -> dict[str, Any]:
    """AdamW (weight decay 0) on `data` for max(`steps`) steps of a copy of `model`; `measure` at each step count
    of `steps` (0: the model as edited, or `at_start` where the caller measured it already). Returns the step
    counts and each metric's values along them."""
    attacked = copy.deepcopy(model)
    module = network(attacked)
    optimizer = torch.optim.AdamW(trainable(module), lr=lr, weight_decay=0.0)
    batches = itertools.cycle(list(data.batches())) if data.examples else iter(())
    torch.manual_seed(seed)  # dropout draws
    grid, values, done = sorted(set(steps)), {}, 0
    for target in grid:
        module.train()
        while done < target:
            optimizer.zero_grad(set_to_none=True)
            loss(attacked, next(batches)).backward()
            optimizer.step()
            done += 1
        module.eval()
        with torch.no_grad():
            measured = at_start if target == 0 and at_start is not None else measure(attacked)
            for metric, value in measured.items():
                values.setdefault(metric, []).append(value)
    del attacked, optimizer
    return {"steps": grid, "metrics": values}
