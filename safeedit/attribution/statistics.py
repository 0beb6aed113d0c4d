"""Streaming per-parameter statistics: what score functions are computed from.

Each statistic reads one data role ("forget", "retain", "calibration", "data"), keeps fp32 states whatever the
model's dtype, adds into them batch after batch, and declares its reduction across processes: all of them are
sums, so a distributed pass is the same code followed by one all-reduce. Memory is one state set per statistic,
nothing proportional to the data; a plain gradient sum of an fp32 model needs none of its own (autograd sums it in
`param.grad`, see `stream._summed_in_grad`), and a bf16 model's gradients are cast to fp32 one tensor at a time.

Under FSDP2 a statistic read from gradients keeps the state of this process's shard only (see
`safeedit.sharding`): the sharded gradient it reads is already reduced across processes, a mean over the
processes' batches, so such states are scaled back to sums instead of all-reduced. That is exact for statistics
linear in the gradient; the others (`linear = False`, e.g. squared gradients) need every process to take the same
batch at each step, which the driver arranges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from safeedit.errors import SafeEditError
from safeedit.sharding import local

Tensors = dict[str, torch.Tensor]


@dataclass
class BatchContext:
    """What a forward hook may need to know about the current batch (the padding mask, for token inputs)."""

    token_mask: torch.Tensor | None = None
    counts: bool = True  # False for a step that only keeps FSDP's processes in lock step: hooks add nothing


@dataclass(frozen=True)
class Statistic:
    """A streaming statistic over one data role; subclasses say how states start and how a batch adds in."""

    role: str
    needs_backward: ClassVar[bool] = True  # states read from `param.grad`, shaped like the (local) parameters
    linear: ClassVar[bool] = True  # a batch adds a linear function of its gradient (see the module docstring)
    # the plain sum of the gradients, which autograd itself accumulates in `param.grad` across backward passes: the
    # driver lets it do so (no state set of its own) where that sum is the same, bit for bit (see `stream.py`)
    summed_by_autograd: ClassVar[bool] = False
    kind: ClassVar[str] = ""

    def init_states(self, model: nn.Module, params: Mapping[str, nn.Parameter], device: torch.device | None) -> Tensors:
        """Zeros shaped like each parameter (this process's shard of a sharded one), fp32."""
        return {
            name: torch.zeros(local(p).shape, dtype=torch.float32, device=device or local(p).device)
            for name, p in params.items()
        }

    def after_backward(self, states: Tensors, params: Mapping[str, nn.Parameter]) -> None:
        """Add this batch's contribution, read from `param.grad`."""

    def attach(self, model: nn.Module, states: Tensors, context: BatchContext) -> list:
        """Register forward hooks (for statistics of activations); return their handles."""
        return []


def _add_gradients(states: Tensors, params: Mapping[str, nn.Parameter], fused: Callable, single: Callable) -> None:
    """Add this batch's gradient of every parameter that received one into its fp32 state.

    fp32 gradients already on the state's device (an fp32 model) go through one fused `torch._foreach_*` call
    `fused(states, grads)`, with no copies. The others (a bf16 model's, or gradients on the accelerator with the
    states kept on the CPU) are cast one tensor at a time by `single(state, fp32_grad)`, so the extra memory is one
    tensor rather than an fp32 copy of every gradient; bf16 -> fp32 is exact, so the sums do not change."""
    fused_states, fused_grads = [], []
    for name, state in states.items():
        grad = params[name].grad
        if grad is None:  # a parameter the loss does not reach contributes zero
            continue
        grad = local(grad)
        if grad.dtype == state.dtype and grad.device == state.device:
            fused_states.append(state)
            fused_grads.append(grad)
        else:
            single(state, grad.to(device=state.device, dtype=state.dtype))  # the cast copy is dropped right after
    if fused_states:
        fused(fused_states, fused_grads)


@dataclass(frozen=True)
class GradientSum(Statistic):
    """g = Σ_batches ∇θ ℓ(batch)."""

    kind: ClassVar[str] = "gradient"
    summed_by_autograd: ClassVar[bool] = True

    def after_backward(self, states: Tensors, params: Mapping[str, nn.Parameter]) -> None:
        _add_gradients(states, params, torch._foreach_add_, torch.Tensor.add_)


@dataclass(frozen=True)
class SquaredGradientSum(Statistic):
    """F = Σ_batches (∇θ ℓ(batch))², the empirical diagonal Fisher."""

    linear: ClassVar[bool] = False
    kind: ClassVar[str] = "squared_gradient"

    def after_backward(self, states: Tensors, params: Mapping[str, nn.Parameter]) -> None:
        _add_gradients(
            states, params, lambda s, g: torch._foreach_addcmul_(s, g, g), lambda s, g: s.addcmul_(g, g)
        )


LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_weight_owners(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Map each selected parameter that is the weight of a linear layer (nn.Linear or GPT-2's Conv1D) to it."""
    modules = dict(model.named_modules())
    owners = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf == "weight" and isinstance(module, LINEAR_TYPES):
            owners[name] = module
    return owners


@dataclass(frozen=True)
class InputSquareSum(Statistic):
    """Σ over tokens of X_j² for every input feature j of each selected linear layer (padding excluded)."""

    needs_backward: ClassVar[bool] = False
    kind: ClassVar[str] = "input_square"

    def init_states(self, model: nn.Module, params: Mapping[str, nn.Parameter], device: torch.device | None) -> Tensors:
        owners = linear_weight_owners(model, list(params))
        check_linear_owners(owners)
        # Shaped to broadcast against the weight: [1, in] for nn.Linear ([out, in]), [in, 1] for Conv1D.
        return {
            name: torch.zeros(
                (1, module.in_features) if isinstance(module, nn.Linear) else (module.weight.shape[0], 1),
                dtype=torch.float32,
                device=device or local(params[name]).device,
            )
            for name, module in owners.items()
        }

    def attach(self, model: nn.Module, states: Tensors, context: BatchContext) -> list:
        def make_hook(state: torch.Tensor):
            def hook(module: nn.Module, inputs: tuple) -> None:
                if not context.counts:
                    return
                x = inputs[0].detach()
                mask = context.token_mask
                if mask is not None and x.shape[:-1] == mask.shape:
                    x = x * mask.unsqueeze(-1).to(x.dtype)
                x = x.reshape(-1, x.shape[-1]).to(device=state.device, dtype=torch.float32)
                state.add_(x.square().sum(dim=0).view_as(state))

            return hook

        owners = linear_weight_owners(model, list(states))
        return [owners[name].register_forward_pre_hook(make_hook(state)) for name, state in states.items()]


def check_linear_owners(owners: Mapping[str, nn.Module]) -> None:
    if not owners:
        raise SafeEditError(
            "activation scores need the weights of linear layers, and the parameter patterns select none; "
            r"select some, e.g. --include '\.weight$' or a pattern matching attention/MLP projections"
        )
