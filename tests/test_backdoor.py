"""Backdoor poisoning: exact counts, triggers present, clean rows untouched, determinism, and the error cases."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from datasets import Array3D, ClassLabel, Dataset, Features, Value
from pydantic import ValidationError

from safeedit.attacks.backdoor import (
    TriggerSpec,
    add_trigger,
    attack_success_rate,
    check_target,
    poison_dataset,
    triggered_test_set,
)
from safeedit.errors import SafeEditError

N = 60


def images(n: int = N, channels: int = 1, side: int = 6, labels: list[int] | None = None) -> Dataset:
    """Random [C, H, W] images in [0, 0.9) (never the patch value), labels 0..3, an extra column kept as is."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((n, channels, side, side)) * 0.9).astype(np.float32)
    features = Features({"id": Value("int64"), "pixel_values": Array3D((channels, side, side), "float32"),
                         "label": ClassLabel(num_classes=4), "source": Value("string")})
    return Dataset.from_dict({"id": [100 + i for i in range(n)], "pixel_values": pixels.tolist(),
                              "label": labels if labels is not None else [i % 4 for i in range(n)],
                              "source": [f"img{i}" for i in range(n)]}, features=features)


def texts(n: int = N) -> Dataset:
    words = ["the", "film", "was", "good", "bad", "and", "long"]
    return Dataset.from_dict({"id": list(range(n)), "label": [i % 2 for i in range(n)],
                              "text": [" ".join(words[(i + k) % 7] for k in range(3 + i % 5)) for i in range(n)]})


def rows(dataset: Dataset) -> list[dict]:
    return list(dataset.with_format(None))


def test_image_poisoning_is_exact_carries_the_patch_and_leaves_the_rest_alone():
    data = images()
    before = rows(data)
    spec = TriggerSpec(kind="patch", target=2, poison_rate=0.25, patch_size=2)
    poisoned = poison_dataset(data, spec, seed=0)
    assert rows(data) == before  # input unchanged
    assert poisoned.column_names == [*data.column_names, "poisoned"]
    assert poisoned.features["label"] == data.features["label"]
    after = rows(poisoned)
    flagged = [row for row in after if row["poisoned"]]
    assert len(flagged) == round(0.25 * N) == 15
    assert [row["id"] for row in after] == [row["id"] for row in before]
    for original, row in zip(before, after, strict=True):
        if row["poisoned"]:
            assert original["label"] != 2 and row["label"] == 2
            pixels = np.asarray(row["pixel_values"])
            assert (pixels[:, -2:, -2:] == 1.0).all()
            outside = np.asarray(original["pixel_values"])
            outside[:, -2:, -2:] = 1.0
            assert np.array_equal(pixels, outside)  # only the patch changed
            assert row["source"] == original["source"]
        else:
            assert {k: v for k, v in row.items() if k != "poisoned"} == original


def test_patch_fits_any_channels_and_size_and_other_values():
    data = images(n=20, channels=3, side=5)
    spec = TriggerSpec(kind="patch", target=0, poison_rate=0.5, patch_size=5, patch_value=0.5)
    poisoned = poison_dataset(data, spec, seed=3).with_format("numpy")[:]  # whole columns as arrays
    mask = poisoned["poisoned"]
    assert mask.sum() == 10
    assert (poisoned["pixel_values"][mask] == 0.5).all()  # a 5x5 patch covers the whole 5x5 image, every channel


def test_text_poisoning_inserts_the_word_and_keeps_everything_else():
    data = texts()
    before = rows(data)
    spec = TriggerSpec(kind="word", target=1, poison_rate=0.2, word="cf", repeats=2)
    poisoned = poison_dataset(data, spec, seed=5)
    assert rows(data) == before
    after = rows(poisoned)
    assert sum(row["poisoned"] for row in after) == 12
    for original, row in zip(before, after, strict=True):
        if row["poisoned"]:
            assert original["label"] == 0 and row["label"] == 1
            words = row["text"].split(" ")
            assert words.count("cf") == 2
            assert [w for w in words if w != "cf"] == original["text"].split()
        else:
            assert {k: v for k, v in row.items() if k != "poisoned"} == original


def test_add_trigger_returns_a_new_dict_and_word_lands_at_any_position():
    example = {"id": 1, "label": 0, "text": "a b c"}
    spec = TriggerSpec(kind="word", word="mn")
    positions = set()
    for seed in range(60):
        triggered = add_trigger(example, spec, random.Random(seed))
        assert example == {"id": 1, "label": 0, "text": "a b c"}
        positions.add(triggered["text"].split().index("mn"))
    assert positions == {0, 1, 2, 3}
    assert add_trigger({"text": ""}, spec, random.Random(0))["text"] == "mn"
    image = {"pixel_values": [[[0.0] * 4 for _ in range(4)]], "label": 1}
    patched = add_trigger(image, TriggerSpec(kind="patch", patch_size=2), random.Random(0))
    assert image["pixel_values"][0][3] == [0.0] * 4
    assert patched["pixel_values"][0][3] == [0.0, 0.0, 1.0, 1.0]
    assert patched["pixel_values"][0][1] == [0.0] * 4
    tensor = torch.zeros(2, 4, 4)
    assert add_trigger({"pixel_values": tensor}, TriggerSpec(kind="patch"), random.Random(0))[
        "pixel_values"][:, 1:, 1:].eq(1).all()
    assert tensor.eq(0).all()


def test_triggered_test_set_drops_the_target_class_and_keeps_true_labels():
    data = texts()
    spec = TriggerSpec(kind="word", target=1)
    test = triggered_test_set(data, spec, seed=0)
    assert len(test) == N // 2
    assert set(test["label"]) == {0}
    assert all("cf" in text.split() for text in test["text"])
    assert list(test["id"]) == [i for i in range(N) if i % 2 == 0]
    image_test = triggered_test_set(images(), TriggerSpec(kind="patch", target=3), seed=0).with_format("numpy")[:]
    assert len(image_test["id"]) == 45 and 3 not in set(image_test["label"].tolist())
    assert (image_test["pixel_values"][:, :, -3:, -3:] == 1.0).all()


def test_same_seed_same_result_other_seed_other_choice():
    spec = TriggerSpec(kind="word", poison_rate=0.3)
    first, again, other = (rows(poison_dataset(texts(), spec, seed=s)) for s in (11, 11, 12))
    assert first == again
    assert [r["poisoned"] for r in first] != [r["poisoned"] for r in other]
    assert rows(triggered_test_set(texts(), spec, 4)) == rows(triggered_test_set(texts(), spec, 4))
    assert rows(triggered_test_set(texts(), spec, 4)) != rows(triggered_test_set(texts(), spec, 5))


def test_torch_format_is_kept():
    poisoned = poison_dataset(images().with_format("torch"), TriggerSpec(kind="patch", target=1), seed=0)
    assert isinstance(poisoned[0]["pixel_values"], torch.Tensor)
    assert poisoned[:]["poisoned"].dtype == torch.bool


def test_attack_success_rate():
    assert attack_success_rate([1, 2, 1, 0], target=1) == 0.5
    assert attack_success_rate(torch.tensor([3, 3, 3]), target=3) == 1.0
    with pytest.raises(SafeEditError, match="no predictions"):
        attack_success_rate([], target=0)
    with pytest.raises(SafeEditError, match="argmax"):
        attack_success_rate(torch.zeros(2, 3), target=0)


def test_errors():
    with pytest.raises(SafeEditError, match="not a class"):
        check_target(TriggerSpec(kind="patch", target=4), num_classes=4)
    check_target(TriggerSpec(kind="patch", target=3), num_classes=4)
    with pytest.raises(SafeEditError, match="not a class"):  # ClassLabel with 4 classes
        poison_dataset(images(), TriggerSpec(kind="patch", target=7), seed=0)
    with pytest.raises(SafeEditError, match="needs 54 examples outside target class 0"):
        poison_dataset(images(labels=[0] * 50 + [1] * 10), TriggerSpec(kind="patch", poison_rate=0.9), seed=0)
    with pytest.raises(SafeEditError, match="empty"):
        poison_dataset(texts().select([]), TriggerSpec(kind="word"), seed=0)
    with pytest.raises(SafeEditError, match="lacks \\['text'\\]"):
        poison_dataset(images(), TriggerSpec(kind="word"), seed=0)
    with pytest.raises(SafeEditError, match="lacks \\['pixel_values'\\]"):
        triggered_test_set(texts(), TriggerSpec(kind="patch"), seed=0)
    with pytest.raises(SafeEditError, match="does not fit"):
        poison_dataset(images(side=2), TriggerSpec(kind="patch"), seed=0)
    with pytest.raises(SafeEditError, match="poisons none"):
        poison_dataset(texts(4), TriggerSpec(kind="word", poison_rate=0.1), seed=0)
    with pytest.raises(SafeEditError, match="empty"):
        triggered_test_set(texts().filter(lambda row: row["label"] == 0), TriggerSpec(kind="word"), seed=0)
    with pytest.raises(SafeEditError, match="already has"):
        poison_dataset(poison_dataset(texts(), TriggerSpec(kind="word"), 0), TriggerSpec(kind="word"), 1)
    for bad in ({"poison_rate": 1.0}, {"poison_rate": 0}, {"target": -1}, {"word": "c f"}, {"word": ""},
                {"repeats": 0}, {"patch_size": 0}, {"extra": 1}):
        with pytest.raises(ValidationError):
            TriggerSpec(kind="word", **bad)
