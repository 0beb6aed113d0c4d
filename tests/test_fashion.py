"""The embedded Fashion-MNIST set, built from tiny synthetic IDX files: no Debian package or hub needed."""

from __future__ import annotations

import gzip
import struct

import datasets
import numpy as np
import pytest

from safeedit.data import fashion, load_data
from safeedit.errors import SafeEditError

TRAIN, TEST = 12, 5


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x00 0x00 0x08 NDIM, big-endian uint32 sizes, the bytes."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(folder, name: str, array: np.ndarray, compress: bool = True) -> None:
    data = idx_bytes(array)
    if compress:
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)


def synthetic(folder, compress: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", TRAIN), ("test", TEST)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
        labels = ((np.arange(count) * 7 + seed) % 10).astype(np.uint8)
        image_name, label_name = fashion.FILES[split]
        write_idx(folder, image_name, images, compress)
        write_idx(folder, label_name, labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Data folder and cache folder in tmp_path; the hub, if anything asks it, is unreachable."""
    source, cache = tmp_path / "fashion", tmp_path / "cache"
    source.mkdir()
    monkeypatch.setenv(fashion.ENV_DIR, str(source))
    monkeypatch.setenv("SAFEEDIT_CACHE", str(cache))

    def no_hub(*args, **kwargs):
        raise ConnectionError("no hub in tests")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    return source, cache


@pytest.mark.parametrize("compress", [True, False])
def test_builds_official_split_with_scaled_pixels_labels_and_unique_ids(env, compress):
    arrays = synthetic(env[0], compress)
    splits = fashion.fashion_mnist_dataset()
    assert set(splits) == {"train", "test"}
    assert (len(splits["train"]), len(splits["test"])) == (TRAIN, TEST)
    for split, offset in (("train", 0), ("test", fashion.TEST_ID_OFFSET)):
        images, labels = arrays[split]
        rows = splits[split].with_format("numpy")[:]
        assert rows["pixel_values"].shape == (len(images), 1, 28, 28)
        assert rows["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(rows["pixel_values"][:, 0], images.astype(np.float32) / 255)
        assert rows["pixel_values"].min() == 0.0 and rows["pixel_values"].max() == 1.0
        np.testing.assert_array_equal(rows["label"], labels)
        np.testing.assert_array_equal(rows["id"], np.arange(len(images)) + offset)
    assert splits["train"].features["label"].names[9] == "Ankle boot"
    assert splits["train"].column_names == ["id", "pixel_values", "label"]


def test_is_an_embedded_source_with_filters(env):
    arrays = synthetic(env[0])
    rows = load_data("fashion-mnist:test[label=4]")
    expected = np.flatnonzero(arrays["test"][1] == 4)
    assert rows["id"][:] == (expected + fashion.TEST_ID_OFFSET).tolist()


def test_second_load_reuses_the_cache_without_parsing(env, monkeypatch):
    synthetic(env[0])
    first = fashion.fashion_mnist_dataset()

    def no_parse(path):
        raise AssertionError(f"parsed {path} although a cache exists")

    monkeypatch.setattr(fashion, "read_idx", no_parse)
    second = fashion.fashion_mnist_dataset()
    assert second["train"]["id"][:] == first["train"]["id"][:]
    np.testing.assert_array_equal(
        second["test"].with_format("numpy")["pixel_values"][:], first["test"].with_format("numpy")["pixel_values"][:]
    )
    cached = list((env[1] / "data" / fashion.CACHE_NAME).iterdir())
    assert len(cached) == 1 and (cached[0] / "dataset_dict.json").exists()  # no temporary folders left behind


def test_changed_source_files_rebuild_and_replace_the_cache(env):
    synthetic(env[0], seed=0)
    fashion.fashion_mnist_dataset()
    arrays = synthetic(env[0], seed=3)
    rebuilt = fashion.fashion_mnist_dataset()
    assert rebuilt["train"]["label"][:] == arrays["train"][1].tolist()
    assert len(list((env[1] / "data" / fashion.CACHE_NAME).iterdir())) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"\x00\x00\x99\x03" + data[4:], "not an IDX file"),  # unknown type code
        (lambda data: b"\x08\x03\x00\x00" + data[4:], "not an IDX file"),  # bytes swapped
        (lambda data: data[:-10], "asks for"),  # truncated data
    ],
)
def test_corrupt_idx_is_a_safeedit_error(env, damage, message):
    synthetic(env[0])
    name = fashion.FILES["train"][0]
    data = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    (env[0] / f"{name}.gz").write_bytes(gzip.compress(damage(data)))
    with pytest.raises(SafeEditError, match=message):
        fashion.fashion_mnist_dataset()


def test_broken_gzip_is_a_safeedit_error(env):
    synthetic(env[0])
    path = env[0] / f"{fashion.FILES['test'][1]}.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SafeEditError, match="broken gzip"):
        fashion.fashion_mnist_dataset()


def test_missing_files_without_hub_name_both_fixes(env, monkeypatch):
    monkeypatch.setenv(fashion.ENV_DIR, str(env[0] / "absent"))
    with pytest.raises(SafeEditError) as raised:
        load_data("fashion-mnist:train")
    message = str(raised.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert fashion.ENV_DIR in message and "hub" in message and "absent" in message
    assert "\n" not in message


def test_hub_copy_is_converted_and_cached(env, monkeypatch):
    rng = np.random.default_rng(1)
    hub = {}
    for split, count in (("train", 4), ("test", 3)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
        hub[split] = (images, datasets.Dataset.from_dict({"image": list(images), "label": [1] * count}, features))
    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.DatasetDict({k: v[1] for k, v in hub.items()}))
    splits = fashion.fashion_mnist_dataset()
    test = splits["test"].with_format("numpy")[:]
    np.testing.assert_array_equal(test["pixel_values"][:, 0], hub["test"][0].astype(np.float32) / 255)
    assert test["id"].tolist() == [60_000, 60_001, 60_002] and test["label"].tolist() == [1, 1, 1]

    def no_hub(name):
        raise AssertionError("asked the hub although its copy is cached")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    assert len(fashion.fashion_mnist_dataset()["train"]) == 4
