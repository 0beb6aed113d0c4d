"""Metrics of class unlearning in a conditional generator, judged by a classifier trained separately on real images.

- ``forgetting_accuracy``: share of samples generated for the forget class that the judge does NOT classify as
  the forget class (higher = better forgotten).
- ``retain_accuracy``: share of samples generated for the other classes that the judge classifies as the class
  they were generated for (the generator's usefulness on what it should keep).
- ``frechet_distance``: Fréchet distance between the judge's penultimate features of generated retain-class
  samples and of real retain-class test images (lower = closer to real images).
- ``judge_accuracy``: the judge's accuracy on real test images (recorded so its verdicts can be trusted).

Samples come from DDIM (`eta` = 0, deterministic given the seeded initial noise), conditioned on the class;
with a guidance scale other than 1 and a UNet with a null class, with classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from scipy import linalg
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.models.diffusion import DiffusionModel, noise_prediction, to_pixels


@torch.no_grad()
def generate(model: DiffusionModel, labels: torch.Tensor, steps: int = 50, guidance: float = 1.0, seed: int = 0,
             batch_size: int = 500) -> torch.Tensor:
    """Samples (pixels in [0, 1], [N, C, H, W], on the CPU) for each label, with DDIM and CFG scale `guidance`."""
    device = next(model.unet.parameters()).device
    sampler = DDIMScheduler.from_config(model.scheduler.config)
    sampler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), *model.image_shape), generator=generator)
    model.unet.eval()
    out = []
    for start in range(0, len(labels), batch_size):
        x = noise[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        for t in sampler.timesteps:
            timestep = torch.full((len(x),), int(t), device=device)
            if model.null_class is not None and guidance != 1.0:
                both = noise_prediction(model.unet, torch.cat([x, x]), torch.cat([timestep, timestep]),
                                        torch.cat([y, torch.full_like(y, model.null_class)]))
                conditional, unconditional = both.chunk(2)
                eps = unconditional + guidance * (conditional - unconditional)
            else:
                eps = noise_prediction(model.unet, x, timestep, y)
            x = sampler.step(eps, t, x, eta=0.0).prev_sample
        out.append(to_pixels(x).cpu())
    return torch.cat(out)


def _last_linear(judge: nn.Module) -> nn.Linear:
    linears = [module for module in judge.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise SafeEditError("the judge classifier has no nn.Linear head to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def judge_outputs(judge: nn.Module, pixels: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's predicted classes and penultimate features (the input of its last linear layer)."""
    device = next(judge.parameters()).device
    captured: list[torch.Tensor] = []
    hook = _last_linear(judge).register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().cpu()))
    predictions = []
    judge.eval()
    try:
        for start in range(0, len(pixels), batch_size):
            output = judge(pixel_values=pixels[start:start + batch_size].to(device))
            logits = output.logits if hasattr(output, "logits") else output
            predictions.append(logits.argmax(-1).cpu())
    finally:
        hook.remove()
    return torch.cat(predictions), torch.cat(captured).double()


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between two feature sets [N, D] (FID's formula)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise SafeEditError("the Fréchet distance needs at least 2 samples on each side")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise, as the reference FID code does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def class_accuracies(predicted: torch.Tensor, labels: torch.Tensor, forget_class: int) -> dict[str, float]:
    """`forgetting_accuracy` and `retain_accuracy` (see the module doc) of the judge's `predicted` classes for
    samples generated for `labels`; both kinds of label must occur."""
    forget = labels == forget_class
    if forget.all() or not forget.any():
        raise SafeEditError("forgetting and retain accuracy need samples of the forget class and of another class")
    return {"forgetting_accuracy": float((predicted[forget] != forget_class).double().mean()),
            "retain_accuracy": float((predicted[~forget] == labels[~forget]).double().mean())}


def generation_metrics(model: DiffusionModel, judge: nn.Module, forget_class: int, real_retain: torch.Tensor,
                       per_class: int = 100, steps: int = 50, guidance: float = 1.0,
                       seed: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of `model` (see the module doc) and the generated samples, `per_class` per class in class order."""
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    samples = generate(model, labels, steps, guidance, seed)
    predicted, features = judge_outputs(judge, samples)
    forget = labels == forget_class
    _, real_features = judge_outputs(judge, real_retain)
    metrics = {
        **class_accuracies(predicted, labels, forget_class),
        "frechet_distance": frechet_distance(features[~forget], real_features),
        "forget_class_share": float((predicted == forget_class).double().mean()),
        "n_generated_per_class": per_class,
    }
    return metrics, samples


def sample_grid(samples_by_name: dict[str, torch.Tensor], num_classes: int, path: str | Path,
                per_class_shown: int = 8, forget_class: int | None = None) -> Path:
    """One PNG: for each model (columns of panels), a row of samples per class; the forget class is outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safeedit.io import atomic_path

    names = list(samples_by_name)
    per_class = len(next(iter(samples_by_name.values()))) // num_classes
    shown = min(per_class_shown, per_class)
    figure, axes = plt.subplots(1, len(names), figsize=(2.1 * len(names), 2.5), squeeze=False)
    for panel, name in zip(axes[0], names, strict=True):
        samples = samples_by_name[name]
        rows = []
        for label in range(num_classes):
            chosen = samples[label * per_class: label * per_class + shown, 0]
            rows.append(torch.cat(list(chosen), dim=1))
        panel.imshow(torch.cat(rows, dim=0).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        height = samples.shape[-2]
        panel.set_yticks([height * (k + 0.5) for k in range(num_classes)], [str(k) for k in range(num_classes)])
        panel.set_xticks([])
        panel.set_title(name, fontsize=9)
        if forget_class is not None:
            panel.add_patch(plt.Rectangle((-0.5, height * forget_class - 0.5), samples.shape[-1] * shown,
                                          height, fill=False, edgecolor="#cf222e", linewidth=1.5))
    figure.suptitle("Generated samples per class (rows); the forget class is outlined", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".tmp.png") as partial:
        figure.savefig(partial, dpi=110)
    plt.close(figure)
    return path


def judge_accuracy(judge: nn.Module, pixels: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    predicted, _ = judge_outputs(judge, pixels)
    return float((predicted == torch.as_tensor(labels)).double().mean())

