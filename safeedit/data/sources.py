"""Data sets from a short spec: embedded names, local files, saved data sets or hub ids, with a row filter.

    SOURCE[:SPLIT][[COLUMN=VALUE,COLUMN!=VALUE,...]]

- SOURCE: an embedded name (`digits`, `fashion-mnist`), a local file (`.jsonl`, `.json`, `.csv`, `.parquet`), a
  folder written by `Dataset.save_to_disk` or holding data files, or a Hugging Face hub id.
- SPLIT: defaults to `train`.
- the bracket filter keeps rows where every condition holds (`digits:train[label=3]`, `[label!=3]`).
  Quote the spec in a shell: brackets are glob characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from safeedit.errors import SafeEditError

EMBEDDED: dict[str, Callable[[], DatasetDict]] = {}


def embedded(name: str):
    def register(builder: Callable[[], DatasetDict]) -> Callable[[], DatasetDict]:
        EMBEDDED[name] = builder
        return builder

    return register


@embedded("digits")
def _digits() -> DatasetDict:
    from safeedit.data.digits import digits_dataset

    return digits_dataset()


@embedded("fashion-mnist")
def _fashion_mnist() -> DatasetDict:
    from safeedit.data.fashion import fashion_mnist_dataset

    return fashion_mnist_dataset()


SPEC = re.compile(r"(?P<source>[^\[\]]+?)(?::(?P<split>[\w.\-]+))?(?:\[(?P<filter>[^\]]*)\])?")
CONDITION = re.compile(r"\s*(?P<column>\w+)\s*(?P<op>!=|=)\s*(?P<value>[^,]+?)\s*")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSpec:
    source: str
    split: str = "train"
    conditions: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        match = SPEC.fullmatch(spec.strip())
        if not match:
            raise SafeEditError(f"data spec {spec!r} not understood; write SOURCE[:SPLIT][[COLUMN=VALUE,...]]")
        conditions = []
        for part in filter(None, (match["filter"] or "").split(",")):
            condition = CONDITION.fullmatch(part)
            if not condition:
                raise SafeEditError(f"filter {part!r} in {spec!r} not understood; write COLUMN=VALUE or COLUMN!=VALUE")
            conditions.append((condition["column"], condition["op"], condition["value"]))
        return cls(match["source"], match["split"] or "train", tuple(conditions))


def _load_source(source: str, split: str) -> Dataset:
    if source in EMBEDDED:
        splits = EMBEDDED[source]()
    else:
        path = Path(source)
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise SafeEditError(f"{path}: unsupported data file type; use .jsonl, .json, .csv or .parquet")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            splits = datasets.load_from_disk(str(path))
        else:
            try:
                splits = datasets.load_dataset(source)
            except Exception as error:
                raise SafeEditError(
                    f"data source {source!r} is neither an embedded set ({', '.join(EMBEDDED)}), a local file or "
                    f"folder, nor a reachable hub data set ({type(error).__name__})"
                ) from None
    if isinstance(splits, Dataset):
        return splits
    if split not in splits:
        raise SafeEditError(f"data source {source!r} has no split {split!r}; it has {', '.join(splits)}")
    return splits[split]


def _matches(column: np.ndarray, op: str, value: str) -> np.ndarray:
    target: object = value
    if np.issubdtype(column.dtype, np.number):
        try:
            target = float(value)
        except ValueError:
            raise SafeEditError(f"filter value {value!r} is not a number but the column is numeric") from None
    hit = column == target
    return hit if op == "=" else ~hit


def load_data(spec: str | DataSpec) -> Dataset:
    """The rows of a data set named by `spec` (see the module docstring); raises if none remain."""
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    dataset = _load_source(spec.source, spec.split)
    if spec.conditions:
        keep = np.ones(len(dataset), dtype=bool)
        for column, op, value in spec.conditions:
            if column not in dataset.column_names:
                raise SafeEditError(
                    f"filter column {column!r} not in data {spec.source!r}; columns: {', '.join(dataset.column_names)}"
                )
            keep &= _matches(np.asarray(dataset[column]), op, value)
        dataset = dataset.select(np.flatnonzero(keep))
    if len(dataset) == 0:
        raise SafeEditError(f"data {spec.source}:{spec.split} has no rows after the filter {list(spec.conditions)}")
    return dataset
