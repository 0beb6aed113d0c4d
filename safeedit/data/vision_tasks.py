"""Four 5-way image classification tasks from real data, for model merging: disjoint class splits of two data sets.

Tasks: `fashion_a` / `fashion_b` are Fashion-MNIST classes 0-4 / 5-9, `digits_a` / `digits_b` are scikit-learn's
digits 0-4 / 5-9. Labels are remapped to 0..4 (a `ClassLabel` with the real class names), so the four tasks share
one label space size and, after resizing, one input shape.

Inputs: `pixel_values` float32 [1, 28, 28] in [0, 1], not normalised. The 8×8 digits are upsampled to 28×28 with
`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` (which keeps values in [0, 1]).

Splits: `train` and `test` come from each source's official split (Fashion-MNIST's files, the digits' fixed
80 / 20 split in `safeedit.data.digits`); nothing moves between them. `max_train` / `max_test` subsample each split,
stratified by class (every class keeps its share, up to rounding), with `seed` choosing which images; `train` is
shuffled with the same seed, `test` keeps source order. The same arguments always give the same data.

Ids: `"fashion:N"` / `"digits:N"` with N the source's own id, so an id names one image across tasks and splits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Value

from safeedit.data.digits import digits_dataset
from safeedit.data.fashion import CLASS_NAMES, fashion_mnist_dataset, source_dir
from safeedit.errors import SafeEditError
from safeedit.io import cache_dir

SIDE = 28
SPLITS = ("train", "test")


@dataclass(frozen=True)
class VisionTask:
    source: str  # "fashion" or "digits"
    classes: tuple[int, ...]  # source labels, in the order of the new labels 0..4
    description: str


TASKS: dict[str, VisionTask] = {
    "fashion_a": VisionTask("fashion", (0, 1, 2, 3, 4), "Fashion-MNIST T-shirt/top, Trouser, Pullover, Dress, Coat"),
    "fashion_b": VisionTask("fashion", (5, 6, 7, 8, 9), "Fashion-MNIST Sandal, Shirt, Sneaker, Bag, Ankle boot"),
    "digits_a": VisionTask("digits", (0, 1, 2, 3, 4), "handwritten digits 0-4 (8×8 upsampled to 28×28)"),
    "digits_b": VisionTask("digits", (5, 6, 7, 8, 9), "handwritten digits 5-9 (8×8 upsampled to 28×28)"),
}
VISION_TASKS: dict[str, str] = {name: task.description for name, task in TASKS.items()}


def vision_task(name: str, max_train: int | None = 2000, max_test: int | None = 500, seed: int = 0) -> DatasetDict:
    """Task `name` as `DatasetDict(train, test)` with columns id (str), pixel_values, label (see the module doc).

    `max_train` / `max_test` cap the split sizes (None: the whole split). Built data is cached in memory, so asking
    again (another experiment arm, another seed loop) is free.
    """
    if name not in TASKS:
        raise SafeEditError(f"unknown vision task {name!r}; choose one of {', '.join(TASKS)}")
    for label, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SafeEditError(f"{label} must be a non-negative integer or None, not {value!r}")
    cached = _built(name, max_train, max_test, int(seed), _source_key(TASKS[name].source))
    # fresh Dataset objects over the same Arrow tables, so a caller's set_format / in-place change stays theirs
    return DatasetDict({split: data.with_format(None) for split, data in cached.items()})


def vision_tasks(
    names: Iterable[str], max_train: int | None = 2000, max_test: int | None = 500, seed: int = 0
) -> dict[str, DatasetDict]:
    """Several tasks at once, `name -> vision_task(name, ...)`, in the order given."""
    return {name: vision_task(name, max_train, max_test, seed) for name in names}


def class_names(source: str) -> list[str]:
    """The real class names of a source's labels 0..9."""
    if source == "fashion":
        return list(CLASS_NAMES)
    return [str(digit) for digit in range(10)]


def source_arrays(source: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, pixels [N, 1, 28, 28] float32, labels) of a whole source split (digits resized), for pretraining."""
    if source == "digits":
        return _digits(split)
    ids, labels, dataset = _fashion_index(split, _source_key("fashion"))
    return ids, dataset[:]["pixel_values"], labels


def resize(pixels: np.ndarray, side: int = SIDE) -> np.ndarray:
    """[N, C, H, W] images resized to side × side, bilinear with align_corners=False."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    resized = torch.nn.functional.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)
    return resized.numpy()


def stratified_sample(labels: np.ndarray, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """Positions of `count` rows of `labels` (all if None or more), each class keeping its share, chosen by `rng`.

    Rows are shuffled, ranked within their class, and taken in order of rank / class size, so any prefix is as
    stratified as rounding allows. Returned in ascending order.
    """
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    rank = np.empty(len(labels), dtype=np.float64)
    for value in np.unique(shuffled):
        where = np.flatnonzero(shuffled == value)
        rank[where] = (np.arange(len(where)) + 0.5) / len(where)
    chosen = order[np.argsort(rank, kind="stable")[:count]]
    return np.sort(chosen)


def _source_key(source: str) -> tuple[str, ...]:
    """What the cached source data depends on: for Fashion-MNIST, the source folder and the cache folder."""
    if source == "digits":
        return ()
    return str(source_dir()), str(cache_dir())


@functools.lru_cache(maxsize=8)
def _built(name: str, max_train: int | None, max_test: int | None, seed: int, key: tuple[str, ...]) -> DatasetDict:
    task = TASKS[name]
    names = class_names(task.source)
    features = Features(
        {
            "id": Value("string"),
            "pixel_values": Array3D(shape=(1, SIDE, SIDE), dtype="float32"),
            "label": ClassLabel(names=[names[c] for c in task.classes]),
        }
    )
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(task.classes)] = np.arange(len(task.classes))
    built = {}
    for split, count, stream in (("train", max_train, 0), ("test", max_test, 1)):
        rng = np.random.default_rng([seed, stream])
        if task.source == "digits":
            ids, pixels, labels = _digits(split)
        else:
            ids, labels, dataset = _fashion_index(split, key)
            pixels = None
        inside = np.flatnonzero(remap[labels] >= 0)
        rows = inside[stratified_sample(labels[inside], count, rng)]
        if split == "train":
            rows = rows[rng.permutation(len(rows))]
        chosen = pixels[rows] if pixels is not None else _fashion_rows(dataset, rows)
        built[split] = _dataset(
            [f"{task.source}:{i}" for i in ids[rows].tolist()], chosen, remap[labels[rows]], features
        )
    return DatasetDict(built)


@functools.lru_cache(maxsize=2)
def _digits(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    columns = digits_dataset()[split].with_format("numpy")[:]
    return columns["id"], resize(columns["pixel_values"]), columns["label"]


@functools.lru_cache(maxsize=4)
def _fashion_index(split: str, key: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, Dataset]:
    """Ids and labels of a Fashion-MNIST split, and the (memory-mapped) split to read chosen pixels from."""
    dataset = fashion_mnist_dataset()[split].with_format("numpy")
    columns = dataset.select_columns(["id", "label"])[:]
    return columns["id"], columns["label"], dataset


def _fashion_rows(dataset: Dataset, rows: np.ndarray) -> np.ndarray:
    """Pixels of `rows` (in that order), read in ascending order, which Arrow does fastest."""
    if len(rows) == 0:
        return np.zeros((0, 1, SIDE, SIDE), dtype=np.float32)
    unique, inverse = np.unique(rows, return_inverse=True)
    return dataset.select(unique)[:]["pixel_values"][inverse]


def _dataset(ids: list[str], pixels: np.ndarray, labels: np.ndarray, features: Features) -> Dataset:
    """A Dataset straight from numpy buffers (no per-row Python objects for the pixels)."""
    schema = features.arrow_schema
    level = pa.array(np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1))
    for size in reversed(pixels.shape[1:]):  # nest the flat values as lists of 28, then 28, then 1
        level = pa.ListArray.from_arrays(pa.array(np.arange(0, len(level) + 1, size, dtype=np.int32)), level)
    pixel_column = pa.ExtensionArray.from_storage(schema.field("pixel_values").type, level)
    table = pa.Table.from_arrays(
        [pa.array(ids, type=pa.string()), pixel_column, pa.array(labels.astype(np.int64))], schema=schema
    )
    return Dataset(table)
