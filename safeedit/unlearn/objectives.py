"""Unlearning objectives for classifiers, as the phases of one epoch.

An objective is a function of the epoch index returning phases: a loader and a loss for each batch. The one
masked loop (`loop.unlearn`) runs them; a mask, or none, is orthogonal to the objective.

- `ft`       fine-tune on the retain set (cross-entropy).
- `ga`       gradient ascent on the forget set (negated cross-entropy).
- `rl`       random labelling (SalUn's objective): a pass over the forget set with labels redrawn uniformly
             at random for every batch, then a pass over the retain set with the true labels.
- `l1_sparse` fine-tune on retain plus α_t·‖θ‖₁ with α_t decaying linearly to 0 over the epochs
             (Jia et al., "Model sparsity can simplify machine unlearning", 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safeedit.batches import default_loss, labels_of

Loss = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class Phase:
    name: str
    loader: Iterable
    loss: Loss


@dataclass(frozen=True)
class Loaders:
    forget: Iterable
    retain: Iterable
    num_classes: int


def with_labels(batch: Any, labels: torch.Tensor) -> Any:
    """The batch with its labels replaced (dict batches: 'label'/'labels'; pairs: the second element)."""
    if isinstance(batch, Mapping):
        key = "labels" if "labels" in batch else "label"
        return {**batch, key: labels}
    inputs, _ = batch
    return inputs, labels


def random_label_loss(num_classes: int, generator: torch.Generator) -> Loss:
    """Cross-entropy against labels drawn uniformly at random, anew for every batch (seeded)."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        true = labels_of(batch)
        drawn = torch.randint(num_classes, true.shape, generator=generator).to(true.device)
        return default_loss(model, with_labels(batch, drawn))

    return loss


def ascent_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return -default_loss(model, batch)


def l1_loss(alpha: float) -> Loss:
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        penalty = sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
        return default_loss(model, batch) + alpha * penalty

    return loss


Objective = Callable[[int], list[Phase]]


def fine_tune(loaders: Loaders, epochs: int, seed: int) -> Objective:
    return lambda epoch: [Phase("retain", loaders.retain, default_loss)]


def gradient_ascent(loaders: Loaders, epochs: int, seed: int) -> Objective:
    return lambda epoch: [Phase("forget", loaders.forget, ascent_loss)]


def random_labels(loaders: Loaders, epochs: int, seed: int) -> Objective:
    relabel = random_label_loss(loaders.num_classes, torch.Generator().manual_seed(seed))
    return lambda epoch: [Phase("forget", loaders.forget, relabel), Phase("retain", loaders.retain, default_loss)]


def l1_sparse(loaders: Loaders, epochs: int, seed: int, alpha: float = 5e-4) -> Objective:
    return lambda epoch: [Phase("retain", loaders.retain, l1_loss(alpha * (1 - epoch / epochs)))]


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "ft": fine_tune,
    "ga": gradient_ascent,
    "rl": random_labels,
    "l1_sparse": l1_sparse,
}
