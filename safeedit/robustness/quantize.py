"""Weight-only quantization, simulated in PyTorch, and why it can undo an edit.

Zhang et al. ("Catastrophic failure of LLM unlearning via quantization", ICLR 2025, code
zzwjames/FailureLLMUnlearning) quantize unlearned models with round-to-nearest (RTN) and see forgotten knowledge
return: an edit smaller than half a quantization step of its group is rounded back to the original's grid point.
The two schemes here are the common weight-only ones:

- ``int8``: symmetric, one scale per output channel, ``s = max|w| / 127``, ``q = clamp(round(w / s), -127, 127)``
  (LLM.int8()'s row-wise absmax, without its outlier columns).
- ``int4``: asymmetric, one scale and zero point per group of `group_size` consecutive inputs of an output
  channel (the ``w4 g128`` RTN of GPTQ/AWQ), ``s = (max - min) / 15``, ``z = round(-min / s)``,
  ``q = clamp(round(w / s) + z, 0, 15)``; dequantized ``(q - z) · s``.

Quantized: the weights of linear and convolution layers (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv1d/2d/3d``),
except ``lm_head`` and any weight tied to an embedding, as GPTQ and AWQ leave them. Biases, norms and embeddings
stay as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from safeedit.errors import SafeEditError

SCHEMES = ("int8", "int4")
QUANTIZED_TYPES = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: its bits, whether symmetric, and its group size (None: one group per channel)."""

    name: str
    bits: int
    symmetric: bool
    group_size: int | None

    @classmethod
    def named(cls, name: str, group_size: int = 128) -> Scheme:
        if name == "int8":
            return cls("int8", 8, True, None)
        if name == "int4":
            return cls("int4", 4, False, group_size)
        raise SafeEditError(f"quantization scheme {name!r} is unknown; choose from {', '.join(SCHEMES)}")

    def describe(self) -> str:
        grouping = f"groups of {self.group_size} inputs" if self.group_size else "per output channel"
        kind = "symmetric absmax" if self.symmetric else "asymmetric min-max"
        return f"{self.name}: round-to-nearest, {kind}, {grouping}, weights only"


def _rows(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The weight as [output channels, inputs] (Conv1D stores [in, out])."""
    matrix = weight.t() if isinstance(module, Conv1D) else weight
    return matrix.reshape(matrix.shape[0], -1)


def _grouped(rows: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """[channels, groups, group size], padded with the row's last value (padding never widens a group's range)."""
    inputs = rows.shape[1]
    size = group_size or inputs
    pad = (-inputs) % size
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(rows.shape[0], -1, size), inputs


def quantize_rows(rows: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized `rows` ([channels, inputs]) and each entry's quantization step (its group's scale), in fp32."""
    groups, inputs = _grouped(rows.detach().float(), scheme.group_size)
    if scheme.symmetric:
        levels = 2 ** (scheme.bits - 1) - 1
        scale = groups.abs().amax(dim=-1, keepdim=True) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.clamp(torch.round(groups / safe), -levels, levels) * safe
    else:
        levels = 2 ** scheme.bits - 1
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = (high - low) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / safe)
        quantized = (torch.clamp(torch.round(groups / safe) + zero, 0, levels) - zero) * safe
    # a constant group (scale 0) is represented exactly
    quantized = torch.where(scale > 0, quantized, groups)
    flat = lambda t: t.expand_as(groups).reshape(groups.shape[0], -1)[:, :inputs]  # noqa: E731
    return flat(quantized), flat(scale)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weights a scheme rounds, by the weight's parameter name."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {f"{name}.weight" if name else "weight": module for name, module in model.named_modules()
            if isinstance(module, QUANTIZED_TYPES) and name.split(".")[-1] != "lm_head"
            and id(module.weight) not in tied}


@torch.no_grad()
def quantize_model(model: Any, scheme: Scheme, network: Callable[[Any], nn.Module] = lambda m: m) -> Any:
    """A copy of `model` with its layer weights rounded to `scheme` (stored back in their own dtype); `network`
    finds the `nn.Module` inside a wrapper."""
    quantized = copy.deepcopy(model)
    for module in quantized_layers(network(quantized)).values():
        weight = module.weight
        values, _ = quantize_rows(_rows(weight, module), scheme)
        shaped = values.reshape(_rows(weight, module).shape)
        shaped = shaped.t() if isinstance(module, Conv1D) else shaped
        weight.copy_(shaped.reshape(weight.shape).to(weight.dtype))
    return quantized


@torch.no_grad()
def revival(original: nn.Module, edited: nn.Module, scheme: Scheme) -> dict[str, Any]:
    """How much of the edit a scheme can round away, per layer: of the weights the edit changed, how many changed
    by less than half a quantization step of their group (`below_half_step`: the mechanism), and how many
    quantize to the same value as the original's weight does under the same scheme, each model with its own group
    scales as a deployment would (`reverted`: the edit gone after quantization)."""
    before = dict(original.named_parameters())
    layers, totals = [], {"edited": 0, "below_half_step": 0, "reverted": 0}
    for name, module in quantized_layers(edited).items():
        if name not in before:
            continue
        old_rows = _rows(before[name], module).float()
        new_rows = _rows(module.weight, module).float()
        changed = old_rows != new_rows
        count = int(torch.count_nonzero(changed))
        if not count:
            continue
        new_values, step = quantize_rows(new_rows, scheme)
        old_values, _ = quantize_rows(old_rows, scheme)
        below = int(torch.count_nonzero(changed & ((new_rows - old_rows).abs() < step / 2)))
        reverted = int(torch.count_nonzero(changed & (new_values == old_values)))
        layers.append({"name": name, "edited": count, "below_half_step": below, "reverted": reverted})
        totals = {"edited": totals["edited"] + count, "below_half_step": totals["below_half_step"] + below,
                  "reverted": totals["reverted"] + reverted}
    edited_count = max(1, totals["edited"])
    return {**totals, "share_below_half_step": totals["below_half_step"] / edited_count,
            "share_reverted": totals["reverted"] / edited_count, "layers": layers}
