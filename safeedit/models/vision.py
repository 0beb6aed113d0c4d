"""The embedded base vision model: a tiny ViT pretrained by the project, self-supervised, as a shared merging base.

`vit-tiny-mnist-rotation` is a `transformers.ViTModel` (28×28×1 input, 7×7 patches so 16 tokens + CLS, width 96,
4 layers, 4 heads, MLP 192, ~0.3 M parameters, no pooling layer). The feature downstream code uses is the CLS
token of `last_hidden_state` (`last_hidden_state[:, 0]`, after the final layer norm).

Pretraining is rotation prediction (Gidaris et al., 2018): each image is turned by 0, 90, 180 or 270 degrees and
a 4-way linear head on the CLS feature names the turn; the head is discarded afterwards. It uses no class labels,
so the base does not already solve the downstream tasks of `safeedit.data.vision_tasks`, yet learns strokes,
shapes and orientation. Images: the first `fashion_images` of a seeded permutation of the Fashion-MNIST train
split plus the digits train split (upsampled to 28×28, repeated `digits_repeats` times so digits are not drowned
out), `epochs` passes with a fresh random turn per image per pass. Only train splits are seen; the rotation
accuracy is measured on held-out test-split images (all four turns of each).

Inputs are pixels in [0, 1] as the data sets give them, shaped [N, 1, 28, 28], with no mean / std normalisation
(the model saves no image processor): callers pass `pixel_values` unchanged.

Shipped: the package carries the pretrained base (`safeedit.models.shipped`), so every machine starts from the
same bytes. Its recipe stays reproducible on one machine (seed 0 for weights, order and turns, one intra-op thread):
`safeedit zoo train vit-tiny-mnist-rotation` pretrains it again here in about 70 s on one CPU core (see `RECIPE`;
needs Fashion-MNIST, see `safeedit.data.fashion`) and saves it under `$SAFEEDIT_CACHE/zoo/`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from safeedit.data.vision_tasks import source_arrays
from safeedit.errors import SafeEditError
from safeedit.models.shipped import ZooEntry, origin_of, register_zoo, zoo_folder
from safeedit.models.state import check_finite
from safeedit.progress import bars_off

VISION_BASE = "vit-tiny-mnist-rotation"
ARCHITECTURE: dict[str, Any] = {
    "image_size": 28,
    "num_channels": 1,
    "patch_size": 7,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 192,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "qkv_bias": True,
}
# About 103,000 image passes (25,748 images × 4 epochs): 67-76 s measured on one core of a shared 2-core machine.
RECIPE: dict[str, Any] = {
    "task": "rotation-4way",
    "seed": 0,
    "fashion_images": 20_000,  # of the 60,000 Fashion-MNIST train images
    "digits_repeats": 4,  # the 1,437 digits train images, each this many times per epoch
    "epochs": 4,
    "batch_size": 256,
    "optimizer": "AdamW",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "warmup_fraction": 0.05,
    "schedule": "cosine",
    "eval_fashion_images": 2_000,  # of the Fashion-MNIST test split, plus all 360 digits test images
}
INFO_FILE = "pretraining.json"


def vit_config() -> transformers.ViTConfig:
    """The architecture of the embedded base (see the module doc)."""
    return transformers.ViTConfig(**ARCHITECTURE)


def recipe_key() -> str:
    """Short hash of architecture + recipe: a local pretraining's folder changes, so it retrains, when either does."""
    return ZOO_ENTRY.recipe_key()


def write_pretrained(folder: Path, progress: bool = True) -> None:
    """Pretrain the base and save it into `folder` (save_pretrained, plus what the pretraining measured)."""
    model, info = pretrain_rotation(progress)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


ZOO_ENTRY = register_zoo(ZooEntry(VISION_BASE, "tiny ViT pretrained by rotation prediction (merging base)",
                                  lambda: {"architecture": ARCHITECTURE, "recipe": RECIPE}, write_pretrained))


def vision_model_folder(weights: str | None = None, progress: bool = True) -> Path:
    """The shipped base's folder (`weights` None or 'shipped'), or this machine's own pretraining ('trained':
    `$SAFEEDIT_CACHE/zoo/vit-tiny-mnist-rotation-KEY`, KEY a hash of architecture and recipe, so a changed recipe
    pretrains again)."""
    origin = origin_of(weights)
    if origin is None:
        raise SafeEditError(f"weights: {weights!r}: the embedded {VISION_BASE} takes shipped or trained; for other "
                            "weights give their save_pretrained folder as the model")
    return zoo_folder(ZOO_ENTRY, origin, progress)


def pretrained_vision_model(progress: bool = True, weights: str | None = None) -> transformers.ViTModel:
    """The embedded base, in eval mode: shipped, or pretrained here once (~70 s) and cached."""
    return _from_folder(str(vision_model_folder(weights, progress)), VISION_BASE, progress)


def load_vision_model(spec: str, progress: bool = True) -> transformers.ViTModel:
    """`vit-tiny-mnist-rotation` (embedded), or a folder / hub id of a ViT saved with `save_pretrained`.

    Safetensors weights only, never remote code; weights missing from the checkpoint are an error, not random.
    A pooling layer in the checkpoint is ignored (the feature is the CLS token of `last_hidden_state`).
    """
    if spec == VISION_BASE:
        return pretrained_vision_model(progress)
    path = Path(spec)
    if path.is_file():
        raise SafeEditError(f"{path}: a file, not a model; pass a folder saved with save_pretrained, or {VISION_BASE}")
    if path.is_dir() and not (path / "config.json").exists():
        raise SafeEditError(f"{path}: no config.json; save the model with save_pretrained() first")
    return _from_folder(spec, spec, progress)


def pretrain_rotation(progress: bool = True) -> tuple[transformers.ViTModel, dict[str, Any]]:
    """Train the base from seed 0 by rotation prediction; return it and what to record (recipe, accuracy, time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(progress)
    finally:
        torch.set_num_threads(threads)


def rotate(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each image [N, C, H, W] turned counter-clockwise by `turns` [N] quarter turns (square images)."""
    out = images.clone()
    for k in range(1, 4):
        where = turns == k
        if where.any():
            out[where] = torch.rot90(images[where], k, dims=(2, 3))
    return out


def rotation_accuracy(model: transformers.ViTModel, head: nn.Module, images: torch.Tensor) -> float:
    """Share of `images` × all four turns whose turn the head predicts from the CLS feature."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(images), 512):
            batch = images[start : start + 512]
            for k in range(4):
                turns = torch.full((len(batch),), k)
                logits = head(model(pixel_values=rotate(batch, turns)).last_hidden_state[:, 0])
                correct += int((logits.argmax(-1) == turns).sum())
                total += len(batch)
    return correct / max(total, 1)


def _pretrain(progress: bool) -> tuple[transformers.ViTModel, dict[str, Any]]:
    started = time.perf_counter()
    seed = RECIPE["seed"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    _, fashion, _ = source_arrays("fashion", "train")
    fashion = fashion[np.sort(rng.permutation(len(fashion))[: RECIPE["fashion_images"]])]
    _, digits, _ = source_arrays("digits", "train")
    images = torch.from_numpy(np.concatenate([fashion, *[digits] * RECIPE["digits_repeats"]]))
    _, fashion_test, _ = source_arrays("fashion", "test")
    fashion_test = fashion_test[np.sort(rng.permutation(len(fashion_test))[: RECIPE["eval_fashion_images"]])]
    _, digits_test, _ = source_arrays("digits", "test")

    model = transformers.ViTModel(vit_config(), add_pooling_layer=False)
    head = nn.Linear(model.config.hidden_size, 4)
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    batch_size, epochs = RECIPE["batch_size"], RECIPE["epochs"]
    steps = epochs * math.ceil(len(images) / batch_size)
    warmup = max(1, round(RECIPE["warmup_fraction"] * steps))

    def factor(step: int) -> float:  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"pretraining {VISION_BASE}", disable=bars_off(progress))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        turns_all = torch.randint(0, 4, (len(images),), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            turns = turns_all[index]
            logits = head(model(pixel_values=rotate(images[index], turns)).last_hidden_state[:, 0])
            loss = nn.functional.cross_entropy(logits, turns)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    check_finite(model, VISION_BASE)
    info = {
        "model": VISION_BASE,
        "key": recipe_key(),
        "architecture": ARCHITECTURE,
        "recipe": RECIPE,
        "train_images": len(images),
        "rotation_accuracy": {
            "fashion_test": round(rotation_accuracy(model, head, torch.from_numpy(fashion_test)), 4),
            "digits_test": round(rotation_accuracy(model, head, torch.from_numpy(digits_test)), 4),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    return model.eval(), info


def _from_folder(spec: str, name: str, progress: bool) -> transformers.ViTModel:
    try:
        config = transformers.AutoConfig.from_pretrained(spec, trust_remote_code=False)
    except Exception as error:
        raise SafeEditError(
            f"{spec!r} is not {VISION_BASE}, a model folder, or a reachable hub id "
            f"({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        ) from None
    if not isinstance(config, transformers.ViTConfig):
        raise SafeEditError(f"{spec}: a {type(config).__name__} model, not a ViT; name a ViTModel checkpoint")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    try:
        model, info = transformers.ViTModel.from_pretrained(
            spec, config=config, add_pooling_layer=False, use_safetensors=True, output_loading_info=True
        )
    except Exception as error:
        raise SafeEditError(
            f"{spec}: could not load safetensors ViT weights ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}); re-save with save_pretrained(..., safe_serialization=True)"
        ) from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        kind, names = next(iter(problems.items()))
        raise SafeEditError(
            f"{spec}: {kind.replace('_', ' ')} when loading a ViTModel (first: {sorted(map(str, names))[0]!r}); "
            "the weights do not belong to this architecture"
        )
    check_finite(model, name)
    return model.eval()
