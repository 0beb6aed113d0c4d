"""A tiny class-conditional diffusers UNet (8×8 grey images, 10 classes + a null class) and a `kind: generation`
scenario around it, shared by the generation tests (tests/test_diffusion.py, tests/test_robustness_generation.py)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel


def tiny_unet(null_class: bool = True) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11 if null_class else 10,
                       norm_num_groups=4)


SCENARIO = {
    "kind": "generation",
    "name": "tiny-diffusion",
    "request": {"what": "the digit 3 in generated images", "requested_by": "a test"},
    "judge": {"name": "digits-cnn"},
    "data": {"source": "digits"},
    "forget": {"kind": "class", "label": 3},
    "methods": {"salun": {"ratio": 0.5, "epochs": 1, "lr": 1e-3, "batch_size": 64, "score_batches": 1},
                "unmasked": {"epochs": 1, "lr": 1e-3, "batch_size": 64}},
    "retrain": {"steps": 3},
    "evaluation": {"per_class": 4, "sampling_steps": 2},
    "criteria": ["salun.retain_accuracy >= 0%"],
    "threads": 1,
}
