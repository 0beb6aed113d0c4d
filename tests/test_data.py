"""Loaders: in-memory batching keeps the Arrow path's order; image columns become pixel tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from torch import nn
from torch.utils.data import DataLoader

from safeedit.data import DataSpec, load_data, make_loader
from safeedit.errors import SafeEditError


def test_in_memory_batches_match_the_arrow_path_for_the_same_seed():
    data = load_data("digits:train").select(range(300))
    fast = list(make_loader(data, nn.Identity(), batch_size=32, shuffle=True, seed=7))
    generator = torch.Generator().manual_seed(7)
    arrow = list(DataLoader(data.with_format("torch", columns=["pixel_values", "label"]), batch_size=32,
                            shuffle=True, generator=generator))
    assert len(fast) == len(arrow) == 10
    for ours, reference in zip(fast, arrow, strict=True):
        assert torch.equal(ours["label"], reference["label"])
        assert torch.equal(ours["pixel_values"], reference["pixel_values"])


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_image_columns_become_channels_first_pixels_in_unit_range(mode, channels):
    rng = np.random.default_rng(0)
    shape = (6, 5, 3) if mode == "RGB" else (6, 5)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(4)]
    from PIL import Image as PILImage

    data = Dataset.from_dict({"img": [PILImage.fromarray(a, mode) for a in arrays], "label": [0, 1, 2, 1]},
                             features=Features({"img": Image(), "label": Value("int64")}))
    batch = next(iter(make_loader(data, nn.Identity(), batch_size=4)))
    assert batch["pixel_values"].shape == (4, channels, 6, 5)
    expected = arrays[2] / 255.0
    expected = expected[None] if mode == "L" else expected.transpose(2, 0, 1)
    assert torch.allclose(batch["pixel_values"][2], torch.tensor(expected, dtype=torch.float32))
    assert batch["label"].tolist() == [0, 1, 2, 1]


def test_data_spec_grammar():
    spec = DataSpec.parse("digits:test[label!=3, label!=4]")
    assert spec == DataSpec("digits", "test", (("label", "!=", "3"), ("label", "!=", "4")))
    test = load_data("digits:test")
    kept = load_data(spec)
    assert len(kept) == sum(1 for label in test["label"] if label not in (3, 4))
    with pytest.raises(SafeEditError, match="not understood"):
        DataSpec.parse("digits:test[label~3]")
    with pytest.raises(SafeEditError, match="not a number"):
        load_data("digits:test[label=three]")
