"""The model zoo: embedded starting points ship inside the package, so every machine starts from the same bytes.

Training a model again from the same seed gives other weights on another CPU: PyTorch's kernel sets (AVX-512,
AVX2, the portable default) add floats in other orders, and a few thousand optimizer steps turn last-bit
differences into another model. A compliance verdict must not depend on that, so the small embedded models
(`digits-cnn`, `fashion-cnn`, `digits-ddpm`, `vit-tiny-mnist-rotation`) are shipped as safetensors in
`safeedit/models/shipped/<name>/`, with their SHA-256 in `manifest.json`, and checked against it when loaded.

The recipe that made each one stays: `safeedit zoo train NAME` trains it again here (cached under
`$SAFEEDIT_CACHE/zoo/<name>-<recipe hash>/`) and says whether the bytes equal the shipped ones; a scenario uses
that local training with `model: {name: NAME, weights: trained}`, and the record says which origin a run used.
Large derived models (the SmolLM2 conversion, fine-tunes) are not shipped: they stay cached by their inputs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from safeedit.errors import SafeEditError
from safeedit.io import atomic_dir, cache_dir, sha256_file, write_text_atomic

SHIPPED_DIR = Path(__file__).parent / "shipped"
MANIFEST = SHIPPED_DIR / "manifest.json"
SHIPPED, TRAINED = "shipped", "trained"
Origin = Literal["shipped", "trained"]
# The modules that register zoo entries when imported (kept here so `zoo_entries` finds all of them).
ZOO_MODULES = ("safeedit.models.zoo", "safeedit.models.diffusion", "safeedit.models.vision")


@dataclass(frozen=True)
class ZooEntry:
    """One embedded model: how to train it into a folder, and the recipe whose hash names a local training."""

    name: str
    summary: str
    recipe: Callable[[], dict]  # everything the weights depend on (architecture, data, optimizer, seed)
    train: Callable[[Path, bool], None]  # train from the seed and write the model's files into the folder

    def recipe_key(self) -> str:
        text = json.dumps(self.recipe(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def trained_folder(self) -> Path:
        return cache_dir() / "zoo" / f"{self.name}-{self.recipe_key()}"

    def train_here(self, progress: bool = True) -> Path:
        """Train from the recipe into `trained_folder()` (atomically, replacing an earlier training) and return it."""
        folder = self.trained_folder()
        with atomic_dir(folder, overwrite=True) as partial:
            self.train(partial, progress)
        return folder


ZOO: dict[str, ZooEntry] = {}


def register_zoo(entry: ZooEntry) -> ZooEntry:
    ZOO[entry.name] = entry
    return entry


def zoo_entries() -> dict[str, ZooEntry]:
    """Every embedded model (imports the modules that define them)."""
    for module in ZOO_MODULES:
        importlib.import_module(module)
    return ZOO


def manifest() -> dict[str, dict]:
    return json.loads(MANIFEST.read_text(encoding="utf-8")) if MANIFEST.is_file() else {}


def origin_of(weights: str | None) -> Origin | None:
    """`weights` as a scenario or `--weights` gives it: None or 'shipped' -> shipped, 'trained' -> a local
    training; anything else is a file path (None returned)."""
    if weights in (None, SHIPPED):
        return SHIPPED
    if weights == TRAINED:
        return TRAINED
    return None


def zoo_folder(entry: ZooEntry, origin: Origin, progress: bool = True) -> Path:
    """The folder holding `entry`'s files: the shipped copy (checked against the manifest), or this machine's own
    training from the recipe (trained now, atomically, if not cached)."""
    if origin == SHIPPED:
        return _checked_shipped(entry.name)
    folder = entry.trained_folder()
    return folder if folder.is_dir() else entry.train_here(progress)


def embedded_weights(name: str, weights: str | None, progress: bool = True,
                     file_name: str = "model.safetensors") -> tuple[Path, str]:
    """The weights file of embedded model `name` and its origin: `weights` None or 'shipped' -> the shipped file,
    'trained' -> this machine's own training (made now if not cached), anything else -> that file ('file')."""
    origin = origin_of(weights)
    if origin is None:
        return Path(weights), "file"
    return zoo_folder(ZOO[name], origin, progress) / file_name, origin


@functools.cache
def _checked_shipped(name: str) -> Path:
    folder = SHIPPED_DIR / name
    files = manifest().get(name, {}).get("files")
    if not files:
        raise SafeEditError(f"{name}: this installation ships no weights for it; train them here with "
                            f"`safeedit zoo train {name}` and use `weights: trained`")
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file() or sha256_file(path) != expected:
            raise SafeEditError(f"{path}: missing or not the shipped bytes (SHA-256 differs from {MANIFEST.name}); "
                                f"reinstall safeedit, or train it here with `safeedit zoo train {name}`")
    return folder


def folder_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file in `folder`, sorted."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def ship(entry: ZooEntry, folder: Path) -> None:
    """Make `folder` (a training of `entry`) the shipped copy: copy its files and record their SHA-256 (developers
    only; the package folder must be writable)."""
    target = SHIPPED_DIR / entry.name
    with atomic_dir(target, overwrite=True) as partial:
        for relative in folder_hashes(folder):
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            (partial / relative).write_bytes((folder / relative).read_bytes())
    from safeedit.record import cpu_numerics

    table = manifest()
    machine = {k: v for k, v in cpu_numerics().items() if k in ("cpu_model", "cpu_capability", "blas")}
    table[entry.name] = {"summary": entry.summary, "recipe": entry.recipe(), "recipe_key": entry.recipe_key(),
                         "trained_with": {"torch": torch.__version__, **machine}, "files": folder_hashes(target)}
    write_text_atomic(MANIFEST, json.dumps(dict(sorted(table.items())), indent=2) + "\n")
    _checked_shipped.cache_clear()
