"""SalUn (Fan et al., ICLR 2024): saliency-based unlearning, as its algorithm box reads.

1. Weight saliency: s = |∇θ ℓ_CE(forget)| summed over forget batches, model in eval mode.
2. Mask: the globally top-r salient weights (r = 0.5 by default).
3. Random labelling restricted to the mask: each epoch, a pass over the forget set with labels redrawn
   uniformly at random per batch, then a pass over the retain set with the true labels; only masked weights move.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field
from torch import nn

from safeedit.attribution import compute_scores
from safeedit.masks import Mask
from safeedit.unlearn.loop import TrainingOptions, unlearn
from safeedit.unlearn.objectives import Loaders, random_labels


class SalUnOptions(TrainingOptions):
    ratio: float = Field(default=0.5, gt=0, le=1, description="share of weights in the saliency mask")


def salun(
    model: nn.Module,
    forget_loader: Iterable,
    retain_loader: Iterable,
    num_classes: int,
    options: SalUnOptions,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, Mask]:
    """The unlearned copy of `model` and the saliency mask that confined the edit."""
    saliency = compute_scores(model, "saliency", {"forget": forget_loader}, progress=progress)
    mask = Mask.top_k(saliency, options.ratio, "global", {"score": "saliency", "method": "salun"})
    objective = random_labels(Loaders(forget_loader, retain_loader, num_classes), options.epochs, seed)
    return unlearn(model, objective, options, mask, progress, "salun"), mask
