"""What the data-driven merges (AdaMerging, Concrete task arithmetic, DAM) share: a base body, task vectors,
frozen per-task heads and unlabeled batches per task, and a differentiable merged forward pass.

The merged parameters θ = θ₀ + M ⊙ Σᵢ λᵢ τᵢ are built as ordinary tensors (differentiable in λ and in the gates
M) and fed to the body with `torch.func.functional_call`, so no model is copied per step. The body's forward takes
the batch and an optional universal perturbation `delta` (an additive image perturbation, or a soft token for
text); see `safeedit.models.encoders`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from safeedit.batches import to_device
from safeedit.merge.vectors import Vector, body_parameters, merged_parameters, task_vectors


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (nats): the unsupervised objective of AdaMerging."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


@dataclass
class MergeSetting:
    """The base body `encoder` (its parameters are θ₀), fine-tuned bodies per task, their heads and unlabeled data.
    The data-free merges (task arithmetic, TIES, DARE) read only θ₀ and the task vectors: for them the body and the
    task models may be name -> tensor mappings, with no heads and no data (`safeedit merge`)."""

    encoder: nn.Module | Mapping[str, torch.Tensor]
    task_encoders: Mapping[str, nn.Module | Mapping[str, torch.Tensor]]
    heads: Mapping[str, nn.Module]
    unlabeled: Mapping[str, Iterable]
    weights: Mapping[str, float] | None = None  # per task (mergekit's `weight`); None: 1 each, as before weights
    densities: Mapping[str, float] | None = None  # per task, in place of a method's own keep/density
    vectors: dict[str, Vector] = field(init=False)
    _streams: dict[str, Iterator] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = task_vectors(self.encoder, self.task_encoders)
        self.tasks = list(self.vectors)
        self.base = body_parameters(self.encoder)
        self.names = list(self.base)
        self.device = next(iter(self.base.values())).device
        for module in (self.encoder, *self.heads.values()):
            if isinstance(module, nn.Module):
                module.eval().requires_grad_(False)

    def densities_or(self, default: float) -> float | dict[str, float]:
        """Each task's own density where the setting gives one, else `default` (the one number: as before)."""
        if not self.densities:
            return default
        return {task: self.densities.get(task, default) for task in self.tasks}

    @property
    def trigger_space(self) -> Any:
        """Where DAM's inverted triggers live (`new_delta`, `project_delta`, `delta_step`): the body's input."""
        return self.encoder

    def shapes(self) -> dict[str, torch.Size]:
        """Shapes of the gated tensors: every merged tensor except embedding tables (their task vectors touch
        only the rows of tokens seen in fine-tuning, and gating them would double the cost of every step)."""
        return {name: tensor.shape for name, tensor in self.base.items() if "embeddings" not in name}

    def parameters(self, coefficients: torch.Tensor, gates: Mapping[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
        """θ = θ₀ + M ⊙ Σᵢ λᵢ τᵢ. `coefficients` is [tasks] (task-wise) or [tasks, tensors] (layer-wise); tensors
        without a gate are merged unmasked."""
        if coefficients.dim() == 1:
            per_task = {task: coefficients[i] for i, task in enumerate(self.tasks)}
        else:
            per_task = {task: dict(zip(self.names, coefficients[i], strict=True)) for i, task in enumerate(self.tasks)}
        return merged_parameters(self.base, self.vectors, per_task, gates)

    def logits(self, parameters: Mapping[str, torch.Tensor], task: str, batch: Mapping,
               delta: torch.Tensor | None = None) -> torch.Tensor:
        features = functional_call(self.encoder, dict(parameters), (batch,), {"delta": delta}, strict=False)
        return self.heads[task](features)

    def restart(self) -> None:
        """Start every task's unlabeled stream from its first batch (each method sees the same batches)."""
        self._streams.clear()

    def batch(self, task: str) -> dict:
        """The next unlabeled batch of `task` (cycling), without labels, on the body's device."""
        if task not in self._streams:
            self._streams[task] = itertools.cycle(self.unlabeled[task])
        batch = next(self._streams[task])
        return to_device({k: v for k, v in batch.items() if k not in ("label", "labels")}, self.device)

    def entropy_loss(self, parameters: Mapping[str, torch.Tensor], batches: Mapping[str, dict]) -> torch.Tensor:
        """Σ over tasks of the mean prediction entropy of the merged body with each task's head."""
        return sum(entropy(self.logits(parameters, task, batches[task])) for task in self.tasks)
