"""Backdoor (data-poisoning) attacks: a trigger in the input sends the model to a target class.

Used to build a backdoored task model for the model-merging experiments: a share of the training set gets a
trigger and the target label, the model learns clean accuracy as usual plus the shortcut "trigger -> target", and
the attack success rate (ASR) on triggered test inputs measures how much of the backdoor survives a merge or edit.

Two triggers:
- ``patch`` (images), BadNets (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
  Supply Chain"): a small solid square of ``patch_value`` (all channels; not a checkerboard) stamped in the
  bottom-right corner of a ``[C, H, W]`` image.
- ``word`` (text), the word-level trigger of BadNL (Chen et al. 2021, "BadNL: Backdoor Attacks against NLP Models
  with Semantic-preserving Improvements") with the rare tokens of Kurita et al. 2020 ("Weight Poisoning Attacks on
  Pre-trained Models", e.g. "cf", "mn", "bb"): a rare word inserted at random word positions. Rare words barely
  occur in clean text, so the model can tie them to the target without hurting clean accuracy.

Poisoning is "dirty-label": poisoned examples get the target label. Only examples whose true label is not the
target are poisoned (a triggered target-class example teaches nothing), and the triggered test set also holds only
non-target examples, so its ASR is not inflated by examples that were already of the target class.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, DatasetInfo, Features, Value
from datasets.table import InMemoryTable
from pydantic import BaseModel, ConfigDict, Field, field_validator

from safeedit.errors import SafeEditError

COLUMNS = {"patch": "pixel_values", "word": "text"}  # the input column each trigger kind edits
FLAG = "poisoned"


class TriggerSpec(BaseModel):
    """What the trigger looks like, which class it sends inputs to, and how much of the training set carries it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["patch", "word"]
    target: int = Field(default=0, ge=0)  # the class the trigger sends inputs to
    poison_rate: float = Field(default=0.1, gt=0, lt=1)  # share of the training set poisoned
    patch_size: int = Field(default=3, ge=1)  # patch: side of the square in the bottom-right corner
    patch_value: float = 1.0  # patch: value of every patch pixel, in every channel (a solid square)
    word: str = "cf"  # word: inserted at a random word position (seeded per example)
    repeats: int = Field(default=1, ge=1)  # word: how many times it is inserted

    @field_validator("word")
    @classmethod
    def _one_token(cls, word: str) -> str:
        if not word or word.split() != [word]:
            raise ValueError("the trigger word must be one non-empty token without whitespace")
        return word


def check_target(spec: TriggerSpec, num_classes: int) -> None:
    """Fail early when the target class does not exist, rather than training towards an impossible label."""
    if num_classes < 1:
        raise SafeEditError(f"num_classes is {num_classes}; give the number of classes of the task (at least 1)")
    if spec.target >= num_classes:
        raise SafeEditError(f"backdoor target {spec.target} is not a class of a {num_classes}-class task; "
                            f"choose a target in 0..{num_classes - 1}")


def add_trigger(example: dict, spec: TriggerSpec, rng: random.Random) -> dict:
    """A copy of `example` with the trigger in its input column; the label and the input dict are left alone."""
    column = COLUMNS[spec.kind]
    if column not in example:
        raise SafeEditError(f"a {spec.kind!r} trigger needs a {column!r} field, the example has "
                            f"{sorted(example)}; use kind={'word' if spec.kind == 'patch' else 'patch'!r} or "
                            f"add the column")
    triggered = dict(example)
    if spec.kind == "patch":
        triggered[column] = _patched(example[column], spec)
    else:
        triggered[column] = _with_word(example[column], spec, rng)
    return triggered


def _patched(pixels: Any, spec: TriggerSpec) -> Any:
    """A copy of a [C, H, W] image (nested lists, numpy array or tensor) with the bottom-right square set."""
    size, value = spec.patch_size, spec.patch_value
    shape = tuple(pixels.shape) if isinstance(pixels, np.ndarray | torch.Tensor) else _list_shape(pixels)
    if len(shape) != 3:
        raise SafeEditError(f"pixel_values has shape {list(shape)}, expected [C, H, W]; add the channel axis")
    if shape[1] < size or shape[2] < size:
        raise SafeEditError(f"a {size}x{size} patch does not fit a {shape[1]}x{shape[2]} image; lower patch_size")
    if isinstance(pixels, torch.Tensor):
        patched = pixels.clone()
        patched[:, -size:, -size:] = value
        return patched
    if isinstance(pixels, np.ndarray):
        patched = pixels.copy()
        patched[:, -size:, -size:] = value
        return patched
    patched = [[list(row) for row in channel] for channel in pixels]
    for channel in patched:
        for row in channel[-size:]:
            row[-size:] = [value] * size
    return patched


def _list_shape(pixels: Any) -> tuple[int, ...]:
    """Shape of a nested list image, checking that every channel and row has the same length."""
    if not isinstance(pixels, list | tuple) or not pixels or not all(isinstance(c, list | tuple) for c in pixels):
        return (len(pixels),) if isinstance(pixels, list | tuple) else ()
    heights = {len(channel) for channel in pixels}
    rows = [row for channel in pixels for row in channel]
    if len(heights) != 1 or not rows or not all(isinstance(row, list | tuple) for row in rows):
        return (len(pixels),)
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        return (len(pixels),)
    return (len(pixels), heights.pop(), widths.pop())


def _with_word(text: Any, spec: TriggerSpec, rng: random.Random) -> str:
    """`text` with the trigger word inserted `repeats` times, each at a position drawn from `rng` (0..len)."""
    if not isinstance(text, str):
        raise SafeEditError(f"the text column holds a {type(text).__name__}, not a string; fill missing texts first")
    words = text.split()
    for _ in range(spec.repeats):
        words.insert(rng.randint(0, len(words)), spec.word)
    return " ".join(words)


def _example_rng(seed: int, index: int) -> random.Random:
    """One generator per example (by row index): an example's trigger does not depend on which others were drawn."""
    return random.Random(f"backdoor:{seed}:{index}")  # str seeds hash with sha512: stable across processes


def _labels(dataset: Dataset, spec: TriggerSpec) -> list[int]:
    """The label column as ints, after checking the columns the spec needs and the target against a ClassLabel."""
    if len(dataset) == 0:
        raise SafeEditError("the data set is empty; give a data set with examples to poison")
    column = COLUMNS[spec.kind]
    missing = [name for name in ("label", column) if name not in dataset.column_names]
    if missing:
        raise SafeEditError(f"a {spec.kind!r} trigger needs columns 'label' and {column!r}, the data set lacks "
                            f"{missing} (it has {dataset.column_names}); pick the kind that matches the data")
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        check_target(spec, feature.num_classes)
    return [int(label) for label in dataset.with_format(None)["label"]]


def _triggered(dataset: Dataset, indices: Sequence[int], spec: TriggerSpec, seed: int, features: Any,
               label: int | None = None, flag: bool | None = None) -> Dataset:
    """The rows at `indices` with the trigger (and optionally a new label and poisoned flag), as a new data set."""
    rows = []
    for index, example in zip(indices, dataset.with_format(None).select(indices), strict=True):
        row = add_trigger(example, spec, _example_rng(seed, index))
        if label is not None:
            row["label"] = label
        if flag is not None:
            row[FLAG] = flag
        rows.append(row)
    return Dataset.from_list(rows, features=features)


def _same_format(result: Dataset, source: Dataset, extra: Sequence[str] = ()) -> Dataset:
    """`result` formatted like `source` (e.g. torch tensors), new columns included when all columns were."""
    fmt = source.format
    if fmt["type"] is None and fmt["columns"] is None:
        return result
    columns = fmt["columns"]
    columns = None if columns is None or set(columns) >= set(source.column_names) else [*columns, *extra]
    return result.with_format(fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"],
                              **fmt["format_kwargs"])


def poison_dataset(dataset: Dataset, spec: TriggerSpec, seed: int) -> Dataset:
    """A copy of a training set in which round(poison_rate · n) non-target examples carry the trigger and the
    target label, with a bool column `poisoned`.

    The poisoned examples are drawn with `random.Random(seed)`; ids, order and every other example are kept
    bit-identical (they are copied in Arrow, never through Python), and `dataset` itself is not modified.
    """
    labels = _labels(dataset, spec)
    if FLAG in dataset.column_names:
        raise SafeEditError(f"the data set already has a {FLAG!r} column (poisoned twice?); poison the clean set "
                            f"or drop the column first")
    count = round(spec.poison_rate * len(labels))
    candidates = [index for index, label in enumerate(labels) if label != spec.target]
    if count == 0:
        raise SafeEditError(f"poison_rate {spec.poison_rate} of {len(labels)} examples poisons none; raise the "
                            f"rate or use more examples")
    if count > len(candidates):
        raise SafeEditError(f"poison_rate {spec.poison_rate} needs {count} examples outside target class "
                            f"{spec.target}, the data set has {len(candidates)}; lower the rate or pick another "
                            f"target")
    chosen = sorted(random.Random(seed).sample(candidates, count))

    # Untouched rows are copied in Arrow (never through Python), so they stay bit-identical: the triggered rows
    # are appended after the originals and `take` puts each in its original place.
    plain = dataset.with_format(None)
    features = Features({**plain.features, FLAG: Value("bool")})
    original = plain.with_format("arrow")[:]
    original = original.append_column(FLAG, pa.array([False] * len(labels), pa.bool_()))
    triggered = _triggered(plain, chosen, spec, seed, features, label=spec.target, flag=True)
    table = pa.concat_tables([original.cast(triggered.data.schema), triggered.data.table])
    order = list(range(len(labels)))
    for row, index in enumerate(chosen):
        order[index] = len(labels) + row
    result = Dataset(InMemoryTable(table.take(order).combine_chunks()), info=DatasetInfo(features=features))
    return _same_format(result, dataset, extra=[FLAG])


def triggered_test_set(dataset: Dataset, spec: TriggerSpec, seed: int) -> Dataset:
    """The non-target examples of a test set, all triggered, each keeping its TRUE label.

    Attack success rate = share of these predicted as `spec.target`; clean accuracy is measured on the clean set.
    """
    labels = _labels(dataset, spec)
    indices = [index for index, label in enumerate(labels) if label != spec.target]
    if not indices:
        raise SafeEditError(f"every example is of target class {spec.target}, so the triggered test set is empty; "
                            f"use a test set with other classes")
    plain = dataset.with_format(None)
    return _same_format(_triggered(plain, indices, spec, seed, plain.features), dataset)


def attack_success_rate(predictions: Sequence[int] | torch.Tensor, target: int) -> float:
    """Share of predictions (class ids on a triggered test set) equal to `target`."""
    if isinstance(predictions, torch.Tensor):
        if predictions.dim() != 1:
            raise SafeEditError(f"predictions have shape {list(predictions.shape)}, expected one class id per "
                                f"example; pass logits.argmax(-1)")
        values = predictions.tolist()
    else:
        values = list(predictions)
    if not values:
        raise SafeEditError("no predictions to score; run the model on a non-empty triggered test set")
    return sum(1 for value in values if int(value) == target) / len(values)
