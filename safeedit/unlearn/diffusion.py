"""SalUn for class-conditional diffusion models (Fan et al. 2024, DESIGN.md section 4).

    1. saliency scores = |∇θ L_diffusion(forget-class images, random timesteps)|, global top-r mask
    2. for each step, with a forget batch (x_f, c_f) and a retain batch (x_r, c_r):
         x_t = noised x_f at a random t;  c' = a random class ≠ c_f
         L = ‖ε_θ(x_t, t, c_f) − ε_θ₀(x_t, t, c')‖²  +  α · L_diffusion(x_r, c_r)
       where θ₀ is the frozen original: the forget condition is mapped onto another class's noise prediction,
       and only weights inside the mask change (the one masked loop, `loop.unlearn`).

Without a mask (`ratio: null`) the same objective updates every weight: the unmasked, ESD-like baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from safeedit.attribution import compute_scores
from safeedit.masks import Mask
from safeedit.methods import EditResult, register_method
from safeedit.models.diffusion import DiffusionModel, diffusion_loss, noise_prediction, noised_at_random_steps
from safeedit.unlearn.loop import TrainingOptions, unlearn
from safeedit.unlearn.objectives import Phase


class DiffusionUnlearnOptions(TrainingOptions):
    ratio: float | None = Field(default=0.5, gt=0, le=1, description="mask ratio; null = no mask (all weights)")
    alpha: float = Field(default=1e-3, ge=0, description="weight of the retain diffusion loss")
    epochs: int = Field(default=3, ge=1, description="passes over the forget set")
    lr: float = Field(default=1e-4, gt=0)
    optimizer: Literal["sgd", "adam"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    score_batches: int = Field(default=8, ge=1, description="forget batches the saliency scores average over")


class PairedBatches:
    """Each forget batch paired with the next retain batch (retain batches cycle; both reshuffled each pass)."""

    def __init__(self, forget: tuple[torch.Tensor, torch.Tensor], retain: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int, generator: torch.Generator) -> None:
        self.forget, self.retain, self.batch_size, self.generator = forget, retain, batch_size, generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        forget_order = torch.randperm(len(self.forget[0]), generator=self.generator)
        retain_order = torch.randperm(len(self.retain[0]), generator=self.generator)
        for step, start in enumerate(range(0, len(forget_order), self.batch_size)):
            f = forget_order[start:start + self.batch_size]
            r_start = (step * self.batch_size) % max(1, len(retain_order) - self.batch_size + 1)
            r = retain_order[r_start:r_start + self.batch_size]
            yield self.forget[0][f], self.forget[1][f], self.retain[0][r], self.retain[1][r]


def forget_remap_loss(model: DiffusionModel, frozen: nn.Module, alpha: float, generator: torch.Generator):
    """SalUn's generation objective on one (forget, retain) batch pair; `frozen` gives the target predictions."""
    classes = model.num_classes

    def loss(unet: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        forget_images, forget_labels, retain_images, retain_labels = batch
        noisy, steps, _ = noised_at_random_steps(model, forget_images, generator)
        shift = torch.randint(1, classes, forget_labels.shape, generator=generator).to(forget_labels.device)
        other = (forget_labels + shift) % classes  # uniformly one of the other classes
        with torch.no_grad():
            target = noise_prediction(frozen, noisy, steps, other)
        forget = torch.nn.functional.mse_loss(noise_prediction(unet, noisy, steps, forget_labels), target)
        if alpha == 0:
            return forget
        return forget + alpha * diffusion_loss(model, unet, retain_images, retain_labels, generator)

    return loss


def diffusion_saliency_scores(model: DiffusionModel, batches: list[tuple[torch.Tensor, torch.Tensor]],
                              generator: torch.Generator, progress: bool = False) -> dict[str, torch.Tensor]:
    """|Σ_batches ∇θ L_diffusion| per parameter (timesteps and noise drawn from `generator`, in batch order)."""

    def loss(unet: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return diffusion_loss(model, unet, batch[0], batch[1], generator)

    return compute_scores(model.unet, "saliency", {"forget": batches}, loss_fn=loss, progress=progress)


def diffusion_saliency_mask(model: DiffusionModel, forget: tuple[torch.Tensor, torch.Tensor], ratio: float,
                            batch_size: int, batches: int, seed: int, progress: bool = True) -> Mask:
    """Global top-`ratio` of the saliency of `batches` forget batches (seeded order, timesteps and noise)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(forget[0]), generator=generator)
    starts = [(k * batch_size) % len(order) for k in range(batches)]
    loader = [(forget[0][order[i:i + batch_size]], forget[1][order[i:i + batch_size]]) for i in starts]
    scores = diffusion_saliency_scores(model, loader, generator, progress)
    return Mask.top_k(scores, ratio, "global", {"score": "saliency", "loss": "diffusion"})


def salun_diffusion(model: DiffusionModel, forget: tuple[torch.Tensor, torch.Tensor],
                    retain: tuple[torch.Tensor, torch.Tensor], options: DiffusionUnlearnOptions, seed: int = 0,
                    progress: bool = True, description: str = "salun") -> tuple[DiffusionModel, Mask | None]:
    """Forget the class of `forget` (images in [-1, 1], labels) in `model`; returns the edited copy and its mask."""
    device = next(model.unet.parameters()).device
    mask = (diffusion_saliency_mask(model, forget, options.ratio, options.batch_size, options.score_batches, seed,
                                    progress) if options.ratio is not None else None)
    frozen = copy.deepcopy(model.unet).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    pairs = PairedBatches((forget[0].to(device), forget[1].to(device)), (retain[0].to(device), retain[1].to(device)),
                          options.batch_size, generator)
    phase = Phase("forget+retain", pairs, forget_remap_loss(model, frozen, options.alpha, generator))
    unet = unlearn(model.unet, lambda epoch: [phase], options, mask, progress, description)
    return DiffusionModel(unet, model.scheduler, model.num_classes), mask


class SalUnDiffusionOptions(DiffusionUnlearnOptions):
    ratio: float = Field(default=0.5, gt=0, le=1, description="share of weights (by saliency) the edit may change")


class UnmaskedDiffusionOptions(DiffusionUnlearnOptions):
    ratio: None = Field(default=None, description="no mask: every weight may change")


class DiffusionRetrainOptions(BaseModel):
    """Training from scratch without the forget class; defaults come from the original model's recipe."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(default=None, ge=1)
    seed_offset: int = Field(default=1000, description="retrain seed = scenario seed + offset")


@dataclass
class GenerationTask:
    """What every generation method gets: the model and the forget / retain images ([-1, 1]) with labels."""

    model: DiffusionModel
    forget: tuple[torch.Tensor, torch.Tensor]
    retain: tuple[torch.Tensor, torch.Tensor]


_GENERATION_LIMITS = (
    "Behavioural evidence only: a separately trained classifier judges a finite number of generated samples; "
    "the class may still be reachable by other prompts, other guidance scales or other sampling procedures. "
)


@register_method("generation", summary="saliency mask + forget class mapped to another class (Fan et al. 2024)",
                 limitations=_GENERATION_LIMITS + "Only the weights with the largest forget-loss gradient change; "
                 "the rest stay bit-identical.", paper="Fan et al., ICLR 2024", name="salun")
def salun_generation(task: GenerationTask, options: SalUnDiffusionOptions, seed: int, progress: bool) -> EditResult:
    return _edit(task, options, seed, progress, "salun")


@register_method("generation", summary="the same objective on every weight (ESD-like baseline)",
                 limitations=_GENERATION_LIMITS + "Every weight may change, so the cost to the other classes is not "
                 "bounded by a mask.", paper="Gandikota et al., ICCV 2023 (ESD), as SalUn's baseline")
def unmasked(task: GenerationTask, options: UnmaskedDiffusionOptions, seed: int, progress: bool) -> EditResult:
    return _edit(task, options, seed, progress, "unmasked")


def _edit(task: GenerationTask, options: DiffusionUnlearnOptions, seed: int, progress: bool,
          description: str) -> EditResult:
    edited, mask = salun_diffusion(task.model, task.forget, task.retain, options, seed, progress, description)
    return EditResult(edited, masks={"mask": mask} if mask is not None else {})
