"""Data sets from a short spec: embedded names, local files, saved data sets or hub ids, with a row filter.

    SOURCE[:SPLIT][[COLUMN=VALUE,COLUMN!=VALUE,...]]

- SOURCE: an embedded name (`digits`, `fashion-mnist`), a local file (`.jsonl`, `.json`, `.csv`, `.parquet`), a
  folder written by `Dataset.save_to_disk` or holding data files, or a Hugging Face hub id.
- SPLIT: defaults to `train`.
- the bracket filter keeps rows where every condition holds (`digits:train[label=3]`, `[label!=3]`).
  Quote the spec in a shell: brackets are glob characters.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from safeedit.data.diagnose import diagnose
from safeedit.errors import SafeEditError
from safeedit.progress import quiet_logger

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
FILE_KINDS = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
# Errors the `datasets` builders raise for a file they cannot read: DatasetGenerationError wrapping the parser's
# (pyarrow, pandas) error, ValueError "corresponds to no data" for a file without rows, StopIteration for an empty
# JSON file, TypeError/KeyError for rows whose fields or types disagree.
BUILDER_ERRORS = (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError, TypeError, KeyError)
GENERIC_FIX = {".jsonl": "check that every row has the same fields and types",
               ".csv": "check that every row has the same fields and types",
               ".json": "write a list of JSON objects, or one JSON object per line",
               ".parquet": "write the file again (e.g. with Dataset.to_parquet); it looks cut or corrupt"}
_SPECS: weakref.WeakKeyDictionary[Dataset, str] = weakref.WeakKeyDictionary()


def spec_of(dataset: Dataset) -> str | None:
    """The spec `load_data` read `dataset` from (None for data sets made otherwise), for messages."""
    return _SPECS.get(dataset)


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
        return cls(match["source"], match["split"] or "train", parse_conditions(match["filter"] or "", repr(spec)))


def _load_source(source: str, split: str) -> Dataset:
    if source in EMBEDDED:
        splits = EMBEDDED[source]()
    else:
        path = Path(source)
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise SafeEditError(f"{path}: unsupported data file type; use .jsonl, .json, .csv or .parquet")
            if split != "train":  # one file is one split: never hand the training rows out as another split
                raise SafeEditError(f"{path} is a single file, one split ('train'), so it has no split {split!r}; "
                                    "in a scenario give data.test_split: 0.2 to hold out a seeded 20% as the test "
                                    "set, or give a folder or data set with that split")
            return _no_rows_check(_build(path, lambda: datasets.load_dataset(builder, data_files=str(path),
                                                                             split="train")), path)
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            # load_from_disk writes nothing, so an OSError here is about the folder (a missing or cut .arrow file)
            splits = _build(path, lambda: datasets.load_from_disk(str(path)), (*BUILDER_ERRORS, OSError),
                            "save it again with Dataset.save_to_disk")
        elif path.is_dir():
            splits = _build(path, lambda: datasets.load_dataset(str(path)), (*BUILDER_ERRORS, FileNotFoundError),
                            "give a folder of .jsonl, .json, .csv, .parquet or image files, or one written by "
                            "Dataset.save_to_disk")
        else:
            try:
                splits = datasets.load_dataset(source)
            except Exception as error:
                raise SafeEditError(
                    f"data source {source!r} is neither an embedded set ({', '.join(EMBEDDED)}), a local file or "
                    f"folder, nor a reachable hub data set ({type(error).__name__})"
                ) from None
    if isinstance(splits, Dataset):
        return _no_rows_check(splits, source)
    if split not in splits:
        raise SafeEditError(f"data source {source!r} has no split {split!r}; it has {', '.join(splits)}")
    return _no_rows_check(splits[split], f"{source}:{split}")


def _no_rows_check(dataset: Dataset, where: str | Path) -> Dataset:
    if len(dataset) == 0:
        raise SafeEditError(f"{where} has no rows; give data with at least one example")
    return dataset


def _build(
    path: Path,
    build: Callable[[], Dataset | DatasetDict],
    errors: tuple[type[BaseException], ...] = BUILDER_ERRORS,
    fix: str = "",
) -> Dataset | DatasetDict:
    """Run a `datasets` builder on a local file or folder; a file it cannot read becomes one line naming the file,
    the line and the fix. The builders convert everything to Arrow before returning, so no parse error is left to
    surface later, when batches are drawn."""
    try:
        with quiet_logger("datasets.packaged_modules", logging.CRITICAL):  # (its parse errors: ours say it once)
            return build()
    except errors as error:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_KINDS) if path.is_dir() else [path]
        for file in files:
            problem = diagnose(file)
            if problem:
                raise SafeEditError(problem) from None
        cause = error.__cause__ or error
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        what = FILE_KINDS.get(path.suffix.lower(), "data") + " file" if path.is_file() else "data folder"
        raise SafeEditError(
            f"{path}: not a readable {what} ({detail[:160]}); "
            f"{fix or GENERIC_FIX.get(path.suffix.lower(), GENERIC_FIX['.csv'])}"
        ) from None


def _matches(column: np.ndarray, op: str, value: str) -> np.ndarray:
    target: object = value
    if np.issubdtype(column.dtype, np.number):
        try:
            target = float(value)
        except ValueError:
            raise SafeEditError(f"filter value {value!r} is not a number but the column is numeric") from None
    hit = column == target
    return hit if op == "=" else ~hit


def parse_conditions(text: str, where: str) -> tuple[tuple[str, str, str], ...]:
    """`COLUMN=VALUE,COLUMN!=VALUE` (the filter grammar of data specs) as (column, op, value) triples."""
    conditions = []
    for part in filter(None, text.split(",")):
        condition = CONDITION.fullmatch(part)
        if not condition:
            raise SafeEditError(f"filter {part!r} in {where} not understood; write COLUMN=VALUE or COLUMN!=VALUE")
        conditions.append((condition["column"], condition["op"], condition["value"]))
    return tuple(conditions)


def matching_rows(dataset: Dataset, conditions: tuple[tuple[str, str, str], ...], where: str) -> np.ndarray:
    """Which rows of `dataset` meet every (column, op, value) condition; an unknown column is named."""
    keep = np.ones(len(dataset), dtype=bool)
    for column, op, value in conditions:
        if column not in dataset.column_names:
            raise SafeEditError(f"filter column {column!r} not in {where}; columns: {', '.join(dataset.column_names)}")
        keep &= _matches(np.asarray(dataset[column]), op, value)
    return keep


def load_data(spec: str | DataSpec) -> Dataset:
    """The rows of a data set named by `spec` (see the module docstring); raises if none remain."""
    text = spec if isinstance(spec, str) else None
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    dataset = _load_source(spec.source, spec.split)
    if spec.conditions:
        dataset = dataset.select(np.flatnonzero(matching_rows(dataset, spec.conditions, f"data {spec.source!r}")))
    if len(dataset) == 0:
        raise SafeEditError(f"data {spec.source}:{spec.split} has no rows after the filter {list(spec.conditions)}")
    _SPECS[dataset] = text or spec.source
    return dataset


def load_train_test(source: str, train_split: str, test_split: str | float, seed: int) -> tuple[Dataset, Dataset,
                                                                                                  str | None]:
    """The training and test sets of a scenario: two named splits of `source`, or, with a fraction as
    `test_split`, a seeded share of the training split held out as the test set (and a note saying so). The test
    set never shares an example id with the training set."""
    train = load_data(f"{source}:{train_split}")
    if isinstance(test_split, float):
        parts = train.train_test_split(test_size=test_split, seed=seed)
        note = (f"The test set is a seeded {test_split:.0%} of {source}:{train_split} (seed {seed}), held out before "
                "the forget request; the other rows are the training set.")
        return parts["train"], parts["test"], note
    if test_split == train_split:
        raise SafeEditError(f"data.test_split is the training split {train_split!r}; name another split, or a "
                            "fraction (e.g. 0.2) to hold out a seeded share of the training rows")
    test = load_data(f"{source}:{test_split}")
    if "id" in train.column_names and "id" in test.column_names:
        shared = set(train["id"]) & set(test["id"])
        if shared:
            raise SafeEditError(f"the {test_split!r} and {train_split!r} splits of {source} share {len(shared)} "
                                f"example id(s) (e.g. {sorted(shared, key=str)[0]!r}); a test set must be held out")
    return train, test, None
