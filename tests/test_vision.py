"""Vision tasks and the embedded ViT base: real digits, synthetic Fashion-MNIST, tiny saved ViTs, no pretraining."""

from __future__ import annotations

import gzip
import json
import struct

import datasets
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from safeedit.data import fashion
from safeedit.data import vision_tasks as vision_tasks_module
from safeedit.data.vision_tasks import VISION_TASKS, stratified_sample, vision_task, vision_tasks
from safeedit.errors import SafeEditError
from safeedit.models import vision
from safeedit.models.shipped import SHIPPED_DIR

TRAIN, TEST = 40, 20  # synthetic Fashion-MNIST sizes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder, a tiny synthetic Fashion-MNIST source, and no hub."""
    source = tmp_path / "fashion"
    source.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN), ("test", TEST)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for name, array in zip(fashion.FILES[split], (images, labels), strict=True):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (source / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    monkeypatch.setenv(fashion.ENV_DIR, str(source))
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))

    def no_hub(*args, **kwargs):
        raise ConnectionError("no hub in tests")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    return tmp_path / "cache"


def columns(split: datasets.Dataset) -> dict[str, np.ndarray]:
    return split.with_format("numpy")[:]


# --- tasks ---------------------------------------------------------------------------------------------------


def test_task_names():
    assert set(VISION_TASKS) == {"fashion_a", "fashion_b", "digits_a", "digits_b"}
    assert all(isinstance(text, str) and text for text in VISION_TASKS.values())


@pytest.mark.parametrize(("name", "names"), [("digits_a", "01234"), ("digits_b", "56789")])
def test_digits_task(name, names):
    task = vision_task(name, max_train=100, max_test=50, seed=0)
    assert set(task) == {"train", "test"}
    assert task["train"].features["label"].names == list(names)
    for split, size in (("train", 100), ("test", 50)):
        data = columns(task[split])
        assert data["pixel_values"].shape == (size, 1, 28, 28) and data["pixel_values"].dtype == np.float32
        assert data["pixel_values"].min() >= 0.0 and data["pixel_values"].max() <= 1.0
        assert set(data["label"].tolist()) == set(range(5))  # stratified: every class present
        assert all(i.startswith("digits:") for i in data["id"].tolist())
    train_ids, test_ids = set(task["train"]["id"]), set(task["test"]["id"])
    assert len(train_ids) == 100 and len(test_ids) == 50 and not train_ids & test_ids


def test_digits_labels_are_the_real_digits():
    """A digit resized back to 8×8 is close to the source image with the same id, and its label maps back."""
    from safeedit.data.digits import digits_dataset

    source = digits_dataset()["test"].with_format("numpy")[:]
    by_id = {int(i): k for k, i in enumerate(source["id"])}
    data = columns(vision_task("digits_b", max_train=10, max_test=None)["test"])
    for id_, label, pixels in zip(data["id"][:20], data["label"][:20], data["pixel_values"][:20], strict=True):
        row = by_id[int(id_.split(":")[1])]
        assert source["label"][row] == label + 5
        small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(pixels)[None], 8)[0].numpy()
        assert np.abs(small - source["pixel_values"][row]).mean() < 0.1


def test_full_splits_and_class_split():
    a, b = vision_task("digits_a", None, None), vision_task("digits_b", None, None)
    assert len(a["train"]) + len(b["train"]) == 1437 and len(a["test"]) + len(b["test"]) == 360
    assert not set(a["train"]["id"]) & set(b["train"]["id"])


def test_deterministic_and_seeded():
    first = columns(vision_task("digits_a", max_train=50, max_test=20, seed=3)["train"])
    vision_tasks_module._built.cache_clear()
    vision_tasks_module._digits.cache_clear()  # rebuilt from scratch, not the cached copy
    again = columns(vision_task("digits_a", max_train=50, max_test=20, seed=3)["train"])
    assert first["id"].tolist() == again["id"].tolist()
    np.testing.assert_array_equal(first["pixel_values"], again["pixel_values"])
    other = columns(vision_task("digits_a", max_train=50, max_test=20, seed=4)["train"])
    assert first["id"].tolist() != other["id"].tolist()
    ordered = [int(i.split(":")[1]) for i in first["id"].tolist()]
    assert ordered != sorted(ordered)  # train is shuffled
    test_ids = [int(i.split(":")[1]) for i in vision_task("digits_a", 50, 20, 3)["test"]["id"]]
    assert test_ids == sorted(test_ids)  # test keeps source order


def test_stratified_sample():
    labels = np.array([0] * 80 + [1] * 20)
    rows = stratified_sample(labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[rows]).tolist() == [8, 2] and (np.diff(rows) > 0).all()
    assert stratified_sample(labels, None, np.random.default_rng(0)).tolist() == list(range(100))
    assert len(stratified_sample(labels, 0, np.random.default_rng(0))) == 0


def test_fashion_tasks(cache):
    tasks = vision_tasks(["fashion_a", "fashion_b"], max_train=None, max_test=None)
    assert tasks["fashion_a"]["train"].features["label"].names == list(fashion.CLASS_NAMES[:5])
    assert tasks["fashion_b"]["test"].features["label"].names == list(fashion.CLASS_NAMES[5:])
    for task in tasks.values():
        train, test = columns(task["train"]), columns(task["test"])
        assert len(train["id"]) == TRAIN // 2 and len(test["id"]) == TEST // 2
        assert train["pixel_values"].shape == (TRAIN // 2, 1, 28, 28)
        assert set(train["label"].tolist()) == set(range(5))
        assert not {*train["id"].tolist()} & {*test["id"].tolist()}
        assert all(int(i.split(":")[1]) >= fashion.TEST_ID_OFFSET for i in test["id"].tolist())
    # labels and pixels are the source's: id N of fashion_b is row N of the synthetic train file, class label + 5
    source = fashion.fashion_mnist_dataset()["train"].with_format("numpy")[:]
    data = columns(tasks["fashion_b"]["train"])
    for id_, label, pixels in zip(data["id"], data["label"], data["pixel_values"], strict=True):
        row = int(id_.split(":")[1])
        assert source["label"][row] == label + 5
        np.testing.assert_array_equal(pixels, source["pixel_values"][row])


def test_fashion_missing_is_a_clear_error(cache, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(fashion.ENV_DIR, str(empty))
    with pytest.raises(SafeEditError, match="Fashion-MNIST not found"):
        vision_task("fashion_a")


def test_bad_requests():
    with pytest.raises(SafeEditError, match="fashion_a, fashion_b, digits_a, digits_b"):
        vision_task("cifar")
    with pytest.raises(SafeEditError, match="max_train"):
        vision_task("digits_a", max_train=-1)


# --- model ---------------------------------------------------------------------------------------------------


def test_vit_config():
    config = vision.vit_config()
    assert (config.image_size, config.num_channels, config.patch_size) == (28, 1, 7)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (96, 4, 4)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.rand(2, 1, 28, 28)).last_hidden_state
    assert out.shape == (2, 17, 96)


def saved(folder, pooling: bool = False) -> transformers.ViTModel:
    model = transformers.ViTModel(vision.vit_config(), add_pooling_layer=pooling).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("pooling", [False, True])
def test_load_folder(tmp_path, pooling):
    model = saved(tmp_path / "vit", pooling)
    loaded = vision.load_vision_model(str(tmp_path / "vit"), progress=False)
    assert isinstance(loaded, transformers.ViTModel) and not loaded.training and loaded.pooler is None
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_load_refuses_bad_folders(tmp_path):
    with pytest.raises(SafeEditError, match=r"config\.json"):
        vision.load_vision_model(str(tmp_path))
    saved(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(SafeEditError, match="safetensors"):
        vision.load_vision_model(str(tmp_path / "pickled"))
    saved(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    del weights["encoder.layer.0.attention.attention.query.weight"]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SafeEditError, match="missing keys"):
        vision.load_vision_model(str(tmp_path / "partial"))
    bert = transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(SafeEditError, match="not a ViT"):
        vision.load_vision_model(str(tmp_path / "bert"))
    with pytest.raises(SafeEditError):
        vision.load_vision_model(str(tmp_path / "pickled" / "pytorch_model.bin"))


def test_embedded_base_is_shipped_and_a_local_pretraining_is_cached(cache, monkeypatch):
    """By default the shipped base loads (no training); `weights: trained` pretrains here once (a stand-in),
    saves atomically under the cache, and later uses load without training."""
    calls = []

    def stand_in(progress=True):
        calls.append(progress)
        torch.manual_seed(0)
        return transformers.ViTModel(vision.vit_config(), add_pooling_layer=False), {"seconds": 0.0}

    monkeypatch.setattr(vision, "pretrain_rotation", stand_in)
    shipped = vision.load_vision_model(vision.VISION_BASE, progress=False)
    assert calls == [] and vision.vision_model_folder() == SHIPPED_DIR / vision.VISION_BASE
    folder = vision.ZOO_ENTRY.trained_folder()
    assert folder.parent == cache / "zoo" and folder.name == f"{vision.VISION_BASE}-{vision.recipe_key()}"
    first = vision.pretrained_vision_model(progress=False, weights="trained")
    assert calls == [False] and (folder / "model.safetensors").exists()
    assert json.loads((folder / vision.INFO_FILE).read_text()) == {"seconds": 0.0}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    second = vision.pretrained_vision_model(progress=False, weights="trained")
    assert calls == [False] and same_weights(first, second) and not same_weights(first, shipped)


def test_recipe_change_changes_the_folder(monkeypatch):
    key = vision.recipe_key()
    monkeypatch.setitem(vision.RECIPE, "epochs", vision.RECIPE["epochs"] + 1)
    assert vision.recipe_key() != key
    monkeypatch.undo()
    monkeypatch.setitem(vision.ARCHITECTURE, "patch_size", 4)
    assert vision.recipe_key() != key


def test_rotate():
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    turned = vision.rotate(images, torch.tensor([0, 1]))
    assert torch.equal(turned[0], images[0]) and torch.equal(turned[1], torch.rot90(images[1], 1, dims=(1, 2)))
    full = images
    for _ in range(4):
        full = vision.rotate(full, torch.tensor([1, 1]))
    assert torch.equal(full, images)


def test_pretraining_loop_runs_and_is_reproducible(cache, monkeypatch):
    """A tiny recipe (synthetic fashion, no digit repeats) through the real loop: finite, seeded, recorded."""
    for key, value in {
        "fashion_images": 16,
        "digits_repeats": 0,
        "epochs": 2,
        "batch_size": 8,
        "eval_fashion_images": 8,
    }.items():
        monkeypatch.setitem(vision.RECIPE, key, value)
    first, info = vision.pretrain_rotation(progress=False)
    again, _ = vision.pretrain_rotation(progress=False)
    assert same_weights(first, again) and not first.training
    assert not same_weights(first, transformers.ViTModel(vision.vit_config(), add_pooling_layer=False))
    assert info["train_images"] == 16 and info["key"] == vision.recipe_key()
    assert set(info["rotation_accuracy"]) == {"fashion_test", "digits_test"}
    assert all(0.0 <= v <= 1.0 for v in info["rotation_accuracy"].values())
