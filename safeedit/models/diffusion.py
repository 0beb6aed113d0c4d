"""Class-conditional diffusion models: a `diffusers` UNet2DModel and its DDPM noise schedule.

The embedded `digits-ddpm` is trained by the project on scikit-learn's 8×8 handwritten digits (train split),
pixels mapped from [0, 1] to [-1, 1], with classifier-free guidance: the class label is replaced by a null class
(index `num_classes`) for `p_uncond` of the examples, so sampling can steer with a guidance scale. One intra-op
thread and a fixed seed give the same weights on one machine; the package ships them (`safeedit.models.shipped`).

Any diffusers UNet given by path works too: a folder with `config.json` and `diffusion_pytorch_model.safetensors`
(`UNet2DModel.save_pretrained`), with its scheduler in `scheduler/` or the folder itself (else the default DDPM
schedule). Its `num_class_embeds` must be the number of classes, or that plus one for a null class.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from safeedit.errors import SafeEditError
from safeedit.io import load_safetensors, save_safetensors, sha256_file
from safeedit.models.shipped import ZooEntry, embedded_weights, register_zoo
from safeedit.models.state import load_state_dict_strict
from safeedit.progress import bars_off

WEIGHTS_FILE = "model.safetensors"


@dataclass
class DiffusionModel:
    """A class-conditional UNet and its training noise schedule."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    num_classes: int

    @property
    def null_class(self) -> int | None:
        """The label meaning 'no class' (classifier-free guidance), if the UNet has one."""
        return self.num_classes if self.unet.config.num_class_embeds == self.num_classes + 1 else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)


def noise_prediction(unet: UNet2DModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    return unet(noisy, timesteps, class_labels=labels).sample


def noised_at_random_steps(model: DiffusionModel, images: torch.Tensor, generator: torch.Generator
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy images, timesteps, noise): each image noised at a uniformly random training timestep.

    Timesteps, then noise, come from `generator` (CPU), so a seeded generator makes every loss built on this
    reproducible.
    """
    steps = torch.randint(0, model.scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    steps, noise = steps.to(images.device), noise.to(images.device)
    return model.scheduler.add_noise(images, noise, steps), steps, noise


def diffusion_loss(model: DiffusionModel, unet: UNet2DModel, images: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The DDPM training loss: MSE between the noise added at a uniformly random timestep and its prediction.

    `unet` is passed separately from `model` so the same loss serves the model being edited.
    """
    noisy, steps, noise = noised_at_random_steps(model, images, generator)
    return torch.nn.functional.mse_loss(noise_prediction(unet, noisy, steps, labels), noise)


def to_model_space(pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (the data sets' pixels) to the diffusion model's [-1, 1]."""
    return pixel_values * 2 - 1


def to_pixels(samples: torch.Tensor) -> torch.Tensor:
    """Generated samples in [-1, 1] back to [0, 1] pixels (clipped)."""
    return ((samples.clamp(-1, 1) + 1) / 2).float()


def image_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set's images (in the model's [-1, 1]) and labels as two tensors, read in one go."""
    columns = dataset.with_format("torch")[:]
    return to_model_space(columns["pixel_values"].float()), columns["label"].long()


@dataclass(frozen=True)
class DiffusionRecipe:
    steps: int = 4000
    lr: float = 1e-3
    batch_size: int = 128
    p_uncond: float = 0.1
    seed: int = 0


def train_diffusion(model: DiffusionModel, images: torch.Tensor, labels: torch.Tensor, recipe: DiffusionRecipe,
                    progress: bool = True, description: str = "training diffusion") -> DiffusionModel:
    """Train `model.unet` in place on `images` ([-1, 1]) and `labels` with AdamW and a cosine learning rate.

    Batches are drawn with replacement-free shuffles per epoch from a seeded generator; with a null class,
    `p_uncond` of the labels are dropped to it (classifier-free guidance).
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    device = next(model.unet.parameters()).device
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.05)
    model.unet.train()
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    for _ in tqdm(range(recipe.steps), desc=description, unit="step", disable=bars_off(progress), leave=False,
                  mininterval=2.0):
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor:cursor + recipe.batch_size]
        cursor += recipe.batch_size
        batch_labels = labels[index].clone()
        if model.null_class is not None:
            dropped = torch.rand(len(index), generator=generator) < recipe.p_uncond
            batch_labels[dropped] = model.null_class
        loss = diffusion_loss(model, model.unet, images[index].to(device), batch_labels.to(device), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.unet.eval()
    return model


def train_from_scratch(like: DiffusionModel, images: torch.Tensor, labels: torch.Tensor, recipe: DiffusionRecipe,
                       progress: bool = True, description: str = "retrain") -> DiffusionModel:
    """A new UNet with `like`'s configuration, initialised from `recipe.seed` and trained on `images` only."""
    torch.manual_seed(recipe.seed)
    device = next(like.unet.parameters()).device
    fresh = DiffusionModel(UNet2DModel.from_config(like.unet.config).to(device), like.scheduler, like.num_classes)
    return train_diffusion(fresh, images, labels, recipe, progress, description)


def digits_unet() -> UNet2DModel:
    """0.7M-parameter UNet for 8×8 grey images, 10 classes + a null class."""
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11, norm_num_groups=8,
    )


def default_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


@dataclass(frozen=True)
class EmbeddedDiffusion:
    name: str
    data: str
    recipe: DiffusionRecipe

    def build(self) -> DiffusionModel:
        return DiffusionModel(digits_unet(), default_scheduler(), num_classes=10)

    def recipe_dict(self) -> dict:
        return {"model": self.name, "data": self.data, **self.recipe.__dict__}

    def write(self, folder: Path, progress: bool = True) -> None:
        trained = train_embedded(self, progress)
        save_safetensors(trained.unet.state_dict(), folder / WEIGHTS_FILE,
                         {"recipe": json.dumps(self.recipe.__dict__), "data": self.data})

    def load(self, progress: bool = True, weights: str | None = None) -> tuple[DiffusionModel, Path, str]:
        """The shipped model (`weights` None or 'shipped'), this machine's own training ('trained', single thread,
        seeded, cached), or a safetensors file of the UNet; with the weights file and that origin."""
        path, origin = embedded_weights(self.name, weights, progress, WEIGHTS_FILE)
        model = self.build()
        tensors, _ = load_safetensors(path)
        load_state_dict_strict(model.unet, tensors, str(path))
        model.unet.eval()
        return model, path, origin


def train_embedded(entry: EmbeddedDiffusion, progress: bool) -> DiffusionModel:
    from safeedit.data import load_data

    images, labels = image_tensors(load_data(f"{entry.data}:train"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(entry.recipe.seed)
        return train_diffusion(entry.build(), images, labels, entry.recipe, progress,
                               f"training {entry.name} (once; cached)")
    finally:
        torch.set_num_threads(threads)


EMBEDDED_DIFFUSION: dict[str, EmbeddedDiffusion] = {
    "digits-ddpm": EmbeddedDiffusion("digits-ddpm", "digits", DiffusionRecipe()),
}
for _entry in EMBEDDED_DIFFUSION.values():
    register_zoo(ZooEntry(_entry.name, f"class-conditional DDPM trained on {_entry.data}", _entry.recipe_dict,
                          _entry.write))


@dataclass
class LoadedDiffusion:
    model: DiffusionModel
    files: dict[str, str]  # the weight file's path -> SHA-256 of its bytes, hashed once at load
    origin: str = "folder"  # shipped | trained | file (embedded models), folder (a diffusers folder)

    @property
    def weights_sha256(self) -> str:
        return next(iter(self.files.values()))


def load_diffusion(spec: str, num_classes: int | None = None, progress: bool = True,
                   weights: str | None = None) -> LoadedDiffusion:
    """An embedded diffusion model by name (`weights`: shipped, trained or a UNet safetensors file), or a
    diffusers UNet folder (safetensors only, never pickles)."""
    if spec in EMBEDDED_DIFFUSION:
        model, path, origin = EMBEDDED_DIFFUSION[spec].load(progress, weights)
        return LoadedDiffusion(model, {str(path): sha256_file(path)}, origin)
    if weights is not None:
        raise SafeEditError(f"weights: applies to embedded diffusion models ({', '.join(EMBEDDED_DIFFUSION)}); "
                            f"for {spec!r} put the weights in its folder")
    folder = Path(spec)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    if not (folder / "config.json").is_file() or not weights_file.is_file():
        choices = ", ".join(EMBEDDED_DIFFUSION)
        raise SafeEditError(f"{spec}: not an embedded diffusion model ({choices}) nor a diffusers UNet folder with "
                            "config.json and diffusion_pytorch_model.safetensors")
    unet = UNet2DModel.from_pretrained(os.fspath(folder), use_safetensors=True)
    embeds = unet.config.num_class_embeds
    if not embeds:
        raise SafeEditError(f"{spec}: the UNet is not class-conditional (num_class_embeds is not set)")
    classes = num_classes or embeds
    if embeds not in (classes, classes + 1):
        raise SafeEditError(f"{spec}: num_class_embeds={embeds} fits neither {classes} classes nor {classes} + null")
    scheduler_folder = next((f for f in (folder / "scheduler", folder) if (f / "scheduler_config.json").is_file()),
                            None)
    scheduler = DDPMScheduler.from_pretrained(os.fspath(scheduler_folder)) if scheduler_folder else default_scheduler()
    files = {str(weights_file): sha256_file(weights_file)}
    return LoadedDiffusion(DiffusionModel(unet.eval(), scheduler, classes), files)
