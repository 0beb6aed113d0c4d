"""Embedded classifiers: architectures the project ships with weights it trained itself (see
`safeedit.models.shipped`: the weights travel in the package; `safeedit zoo train NAME` makes them again here)."""

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
from safeedit.models.shipped import ZooEntry, embedded_weights, register_zoo
from safeedit.models.state import load_state_dict_strict
from safeedit.models.training import accuracy, train_classifier

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    build: Callable[[], nn.Module]
    data: str  # embedded data set it is trained on
    epochs: int
    lr: float
    batch_size: int = 64
    seed: int = 0

    def recipe(self) -> dict:
        return {"model": self.name, "data": self.data, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "seed": self.seed, "optimizer": "AdamW"}

    def train(self, progress: bool = True) -> tuple[nn.Module, dict[str, str]]:
        """Train from the seed. One intra-op thread: float sums then happen in one order on a given machine (and
        tiny models train fastest that way); another CPU's kernels still give other bytes, hence the shipped copy."""
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
        recipe = {k: v for k, v in self.recipe().items() if k != "model"}
        return model, {"recipe": json.dumps(recipe), "test_accuracy": f"{test_accuracy:.4f}"}

    def write(self, folder: Path, progress: bool = True) -> None:
        model, metadata = self.train(progress)
        save_safetensors(model.state_dict(), folder / WEIGHTS_FILE, {"model": self.name, **metadata})

    def load(self, progress: bool = True, weights: str | None = None) -> tuple[nn.Module, Path, str]:
        """The model with the shipped weights (`weights` None or 'shipped'), this machine's own training from the
        recipe ('trained'), or a safetensors file. Returns the model, its weights file and that origin."""
        path, origin = embedded_weights(self.name, weights, progress, WEIGHTS_FILE)
        model = self.build()
        tensors, _ = load_safetensors(path)
        load_state_dict_strict(model, tensors, str(path))
        return model.eval(), path, origin


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
for _entry in EMBEDDED_MODELS.values():
    register_zoo(ZooEntry(_entry.name, f"CNN classifier trained on {_entry.data}", _entry.recipe, _entry.write))
__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "cache_dir"]
