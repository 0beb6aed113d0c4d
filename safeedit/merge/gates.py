"""Concrete (relaxed Bernoulli) gates over parameters: one learnable logit per weight.

A sample is m = σ((x + log u − log(1 − u)) / T), u ~ U(0, 1), T = 0.5 (Maddison et al. 2017; as in Concrete
subspace learning, Tang et al. 2023, and DAM). The final mask is deterministic: keep a weight iff σ(x) > 0.5.

Why not `captum.module.BinaryConcreteStochasticGates`: its gates are hard-concrete (stretched and clamped, with an
L0 penalty) and gate the *inputs* of a module, one gate per input feature; DAM and Concrete task arithmetic need
the plain Concrete relaxation above, one gate per parameter entry, with parameter-shaped samples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safeedit.masks import Mask

TEMPERATURE = 0.5


class ConcreteGates:
    """Logits `x` (leaf tensors, one per parameter tensor) and their samples and final mask."""

    def __init__(self, shapes: Mapping[str, torch.Size], init_logit: float = 3.0,
                 temperature: float = TEMPERATURE, device: torch.device | str = "cpu") -> None:
        self.temperature = temperature
        self.logits = {name: torch.full(tuple(shape), float(init_logit), device=device, requires_grad=True)
                       for name, shape in shapes.items()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.logits.values())

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A relaxed 0/1 sample per entry, differentiable in the logits."""
        samples = {}
        for name, logit in self.logits.items():
            noise = torch.rand(logit.shape, generator=generator, device=logit.device).logit_(eps=1e-6)
            samples[name] = torch.sigmoid((logit + noise) / self.temperature)
        return samples

    def deterministic(self) -> dict[str, torch.Tensor]:
        """The final 0/1 gates: σ(x) > 0.5, that is x > 0 (no sampling, so the same logits give the same mask)."""
        return {name: (logit.detach() > 0).to(logit.dtype) for name, logit in self.logits.items()}

    def mask(self, metadata: Mapping[str, str] | None = None) -> Mask:
        """The final gates as a bool `Mask` (True = the weight's task-vector entries are kept)."""
        info = {"score": "learned Concrete gates", "scope": "sigma(logit) > 0.5", **(metadata or {})}
        return Mask({name: logit.detach().cpu() > 0 for name, logit in self.logits.items()}, info)
