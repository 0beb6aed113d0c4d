"""Task vectors: what fine-tuning added to a shared pretrained body, τᵢ = θᵢ − θ₀ (Ilharco et al., 2023).

Only the shared body is merged: every task keeps its own classification head. Parameters are compared by name,
shape and dtype before anything is subtracted, so models of another architecture are refused with the name of the
first tensor that differs. Buffers (position ids, batch-norm statistics) are taken from the base model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.models.state import check_finite

Vector = dict[str, torch.Tensor]


def body_parameters(model: nn.Module | Mapping[str, torch.Tensor]) -> Vector:
    """Detached floating-point parameters of a module (or a name -> tensor mapping, taken as is)."""
    if isinstance(model, nn.Module):
        return {name: p.detach() for name, p in model.named_parameters() if torch.is_floating_point(p)}
    return {name: t.detach() for name, t in model.items() if torch.is_floating_point(t)}


def check_same_architecture(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                            what: str) -> None:
    """Raise a one-line error naming the first tensor in which `other` differs from `base`."""
    for name, tensor in base.items():
        if name not in other:
            raise SafeEditError(f"{what}: tensor {name!r} of the base model is missing; all task models must share "
                                "the base model's architecture")
        if tuple(other[name].shape) != tuple(tensor.shape) or other[name].dtype != tensor.dtype:
            raise SafeEditError(f"{what}: tensor {name!r} is {tuple(other[name].shape)} {other[name].dtype}, the "
                                f"base has {tuple(tensor.shape)} {tensor.dtype}; task models must be fine-tunes of "
                                "the base model")
    extra = [name for name in other if name not in base]
    if extra:
        raise SafeEditError(f"{what}: tensor {extra[0]!r} is not in the base model; task models must share the base "
                            "model's architecture")
    check_finite(other, what)


def task_vectors(base: nn.Module | Mapping[str, torch.Tensor],
                 tasks: Mapping[str, nn.Module | Mapping[str, torch.Tensor]]) -> dict[str, Vector]:
    """τᵢ = θᵢ − θ₀ for every task model, after checking every model against the base."""
    if not tasks:
        raise SafeEditError("merging needs at least one task model")
    base_params = body_parameters(base)
    vectors = {}
    for task, model in tasks.items():
        params = body_parameters(model)
        check_same_architecture(base_params, params, f"task model {task!r}")
        vectors[task] = {name: params[name] - tensor for name, tensor in base_params.items()}
    return vectors


Coefficient = float | torch.Tensor


def merged_parameters(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Vector],
                      coefficients: Mapping[str, Coefficient | Mapping[str, Coefficient]],
                      mask: Mapping[str, torch.Tensor] | None = None) -> Vector:
    """θ = θ₀ + M ⊙ Σᵢ λᵢ τᵢ; λᵢ a number per task, or per task and tensor (layer-wise); M optional (0/1 or
    relaxed gates), and tensors it does not name are merged unmasked. Differentiable in tensor λ and M."""
    merged = {}
    for name, tensor in base.items():
        update = sum(_coefficient(coefficients[task], name) * vector[name] for task, vector in vectors.items())
        gate = mask.get(name) if mask is not None else None
        merged[name] = tensor + (update * gate.to(tensor.dtype) if gate is not None else update)
    return merged


def _coefficient(coefficient: Coefficient | Mapping[str, Coefficient], name: str) -> Coefficient:
    return coefficient[name] if isinstance(coefficient, Mapping) else coefficient


def with_parameters(model: nn.Module, parameters: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` carrying `parameters` (the input model is not modified)."""
    copied = copy.deepcopy(model)
    own = dict(copied.named_parameters())
    with torch.no_grad():
        for name, tensor in parameters.items():
            own[name].copy_(tensor)
    return copied
