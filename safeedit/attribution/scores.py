"""The score functions of DESIGN.md section 3. Each is one registered function; the driver does the streaming.

θ are the weights, g_f = Σ_batches ∇θ ℓ_f and g_r = Σ_batches ∇θ ℓ_r the summed gradients of the forget and
retain losses, all in fp32.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from pydantic import PositiveFloat

from safeedit.attribution.registry import register_score
from safeedit.attribution.statistics import GradientSum, InputSquareSum, SquaredGradientSum, Tensors
from safeedit.config import Seed
from safeedit.sharding import local, shard_like

ForgetGradient = Annotated[Tensors, GradientSum("forget")]
RetainGradient = Annotated[Tensors, GradientSum("retain")]
SquaredGradient = Annotated[Tensors, SquaredGradientSum("data")]
CalibrationInputSquares = Annotated[Tensors, InputSquareSum("calibration")]


@register_score
def saliency(weights: Tensors, forget_gradient: ForgetGradient) -> Tensors:
    """SalUn gradient saliency: s = |g_f|, g_f the summed gradient of the forget loss."""
    return {name: g.abs_() for name, g in forget_gradient.items()}


@register_score
def wagle(
    weights: Tensors, forget_gradient: ForgetGradient, retain_gradient: RetainGradient, gamma: PositiveFloat = 1.0
) -> Tensors:
    """WAGLE attribution: s = |(θ − g_r/γ) ⊙ g_f|, γ·I standing in for the retain-loss Hessian."""
    return {
        name: g_r.div_(-gamma).add_(weights[name].float()).mul_(forget_gradient[name]).abs_()
        for name, g_r in retain_gradient.items()
    }


@register_score
def wanda(weights: Tensors, calibration_input_squares: CalibrationInputSquares) -> Tensors:
    """Wanda: s_ij = |W_ij| · ‖X_j‖₂ over the calibration tokens, for linear-layer weights only."""
    # The input statistics are shaped to broadcast against the weight ([1, in] for nn.Linear, [in, 1] for Conv1D).
    return {
        name: weights[name].detach().float().abs().mul_(squares.sqrt_().to(weights[name].device))
        for name, squares in calibration_input_squares.items()
    }


@register_score
def fisher(weights: Tensors, squared_gradient: SquaredGradient) -> Tensors:
    """Empirical diagonal Fisher: s = Σ_batches (∇θ ℓ)²."""
    return squared_gradient


@register_score
def magnitude(weights: Tensors) -> Tensors:
    """Weight magnitude: s = |θ|."""
    return {name: w.detach().float().abs() for name, w in weights.items()}


@register_score
def random(weights: Tensors, seed: Seed = 0) -> Tensors:
    """Uniform noise, seeded per tensor name (the control for every ablation; same on any device or sharding)."""
    scores = {}
    for name, w in weights.items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        scores[name] = shard_like(torch.rand(w.shape, generator=generator).to(local(w).device), w)
    return scores
