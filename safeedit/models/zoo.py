"""Embedded models: architectures the project ships and weights it trains itself, seeded and cached.

The first use trains the model (seconds on a CPU) and caches its weights as safetensors under
`$SAFEEDIT_CACHE` (default `~/.cache/safeedit`); later uses load the cache. Delete the file to retrain: the
same seed gives the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safeedit.data.loaders import make_loader
from safeedit.data.sources import load_data
from safeedit.io import cache_dir, load_safetensors, save_safetensors
from safeedit.models.classifiers import SmallCNN, SmallCNNConfig
from safeedit.models.state import load_state_dict_strict
from safeedit.models.training import accuracy, train_classifier


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    build: Callable[[], nn.Module]
    data: str  # embedded data set it is trained on
    epochs: int
    lr: float
    batch_size: int = 64
    seed: int = 0

    def weights_path(self) -> Path:
        return cache_dir() / "models" / f"{self.name}-seed{self.seed}.safetensors"

    def train(self, progress: bool = True) -> tuple[nn.Module, dict[str, str]]:
        """Train from the seed. One intra-op thread: float sums then happen in one order on every machine, so the
        same seed gives bit-identical weights (and tiny models train fastest that way)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._train(progress)
        finally:
            torch.set_num_threads(threads)

    def _train(self, progress: bool) -> tuple[nn.Module, dict[str, str]]:
        torch.manual_seed(self.seed)
        model = self.build()
        train = load_data(f"{self.data}:train")
        loader = make_loader(train, model, batch_size=self.batch_size, shuffle=True, seed=self.seed)
        train_classifier(model, loader, self.epochs, self.lr, progress=progress, description=f"training {self.name}")
        test_accuracy = accuracy(model, make_loader(load_data(f"{self.data}:test"), model, batch_size=256))
        recipe = {
            "data": self.data,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "optimizer": "AdamW",
        }
        return model, {"recipe": json.dumps(recipe), "test_accuracy": f"{test_accuracy:.4f}"}

    def load(self, progress: bool = True, weights: Path | None = None) -> tuple[nn.Module, Path]:
        """The model with `weights` (a safetensors file), else the cached weights, trained first if not cached."""
        path = weights or self.weights_path()
        if weights is None and not path.exists():
            model, metadata = self.train(progress)
            save_safetensors(model.state_dict(), path, {"model": self.name, **metadata})
        model = self.build()
        tensors, _ = load_safetensors(path)
        load_state_dict_strict(model, tensors, str(path))
        return model.eval(), path


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "digits-cnn": EmbeddedModel(
        "digits-cnn",
        lambda: SmallCNN(SmallCNNConfig(in_channels=1, num_classes=10, width=32)),
        "digits",
        epochs=20,
        lr=2e-3,
    ),
    # Strided convolutions (~20× cheaper than full resolution on 28×28) keep Fashion-MNIST retraining, the
    # reference every benchmark seed needs, near 40 s on 2 CPU cores.
    "fashion-cnn": EmbeddedModel(
        "fashion-cnn",
        lambda: SmallCNN(SmallCNNConfig(in_channels=1, num_classes=10, width=16, downsample="stride")),
        "fashion-mnist",
        epochs=10,
        lr=2e-3,
        batch_size=128,
    ),
}
