"""scikit-learn's bundled handwritten digits (1,797 real 8×8 images), with a fixed, documented split.

Split: stratified 80 / 20 train / test with `train_test_split(random_state=0)`, 1,437 / 360 images. Pixels are
scaled from 0..16 to [0, 1]. Each example keeps its row index in `load_digits()` as `id`, so forget sets are
named by stable ids.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits_dataset() -> DatasetDict:
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    ids = np.arange(len(images))
    train_ids, test_ids = train_test_split(ids, test_size=0.2, random_state=0, stratify=bunch.target)

    def split(index: np.ndarray) -> Dataset:
        index = np.sort(index)
        return Dataset.from_dict(
            {"id": index.tolist(), "pixel_values": images[index].tolist(), "label": bunch.target[index].tolist()}
        )

    return DatasetDict(train=split(train_ids), test=split(test_ids))
