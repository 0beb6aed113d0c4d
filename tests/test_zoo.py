"""The model zoo: embedded models load from the shipped bytes (checked against the manifest) on every machine; a
local training from the recipe is opt-in, cached, and the record says which one a run used."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from safeedit.cli import main
from safeedit.errors import SafeEditError
from safeedit.io import save_safetensors, sha256_file
from safeedit.models import load_model, shipped, zoo
from safeedit.models.diffusion import load_diffusion

EMBEDDED = ("digits-cnn", "fashion-cnn", "digits-ddpm", "vit-tiny-mnist-rotation")


def test_every_embedded_model_ships_with_its_sha256():
    entries, table = shipped.zoo_entries(), shipped.manifest()
    assert set(EMBEDDED) <= set(entries) and set(entries) == set(table)
    for name in EMBEDDED:
        files = table[name]["files"]
        assert any(path.endswith(".safetensors") for path in files)
        for path, digest in files.items():
            assert sha256_file(shipped.SHIPPED_DIR / name / path) == digest, (name, path)
        assert table[name]["recipe_key"] == entries[name].recipe_key()  # the shipped bytes came from this recipe


def test_embedded_models_load_the_shipped_bytes_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    loaded = load_model("digits-cnn", progress=False)
    assert loaded.origin == "shipped"
    assert list(loaded.files) == [str(shipped.SHIPPED_DIR / "digits-cnn" / "model.safetensors")]
    diffusion = load_diffusion("digits-ddpm", progress=False)
    assert diffusion.origin == "shipped" and diffusion.weights_sha256 == shipped.manifest()["digits-ddpm"]["files"][
        "model.safetensors"]
    assert not (tmp_path / "cache").exists()  # nothing was trained or cached


def test_changed_shipped_bytes_are_refused_with_the_fix(tmp_path, monkeypatch):
    copy = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED_DIR, copy)
    weights = copy / "digits-cnn" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "SHIPPED_DIR", copy)
    monkeypatch.setattr(shipped, "MANIFEST", copy / "manifest.json")
    shipped._checked_shipped.cache_clear()
    try:
        with pytest.raises(SafeEditError, match=r"not the shipped bytes.*safeedit zoo train digits-cnn"):
            load_model("digits-cnn", progress=False)
    finally:
        shipped._checked_shipped.cache_clear()


def test_trained_weights_are_made_once_from_the_recipe_and_cached(tmp_path, monkeypatch):
    """`weights: trained` trains into the cache (a fast stand-in trainer here) and reuses it afterwards."""
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def stand_in(folder, progress=True):
        calls.append(folder)
        torch.manual_seed(7)
        save_safetensors(zoo.EMBEDDED_MODELS["digits-cnn"].build().state_dict(), folder / zoo.WEIGHTS_FILE)

    monkeypatch.setitem(shipped.ZOO, "digits-cnn", dataclasses.replace(shipped.ZOO["digits-cnn"], train=stand_in))
    first = load_model("digits-cnn", "trained", progress=False)
    second = load_model("digits-cnn", "trained", progress=False)
    assert len(calls) == 1 and first.origin == second.origin == "trained"
    assert next(iter(first.files)).startswith(str(tmp_path / "cache" / "zoo" / "digits-cnn-"))
    assert first.weights_sha256 == second.weights_sha256 != load_model("digits-cnn", progress=False).weights_sha256


def test_zoo_list_names_every_model(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EMBEDDED) and "not trained here" in out
    assert main(["zoo", "train", "no-such-model"]) == 2
