"""Forget requests: which training examples must go. The rest of the training set is the retain set.

Four kinds, as a user states them: every example of one class (`class`), a seeded random share of the
training set (`random`), a list of ids (`ids`: integers or strings, looked up in the `id` column or in the
`column` named, e.g. `{kind: ids, column: customer_id, ids: [C007]}` for one customer's records), or the rows a
filter matches (`where`: `{customer_id: C007}`, or the data-spec grammar `"customer_id=C007,label!=3"`). Forget and
retain are disjoint by construction and each must be non-empty; both are fingerprinted (count and SHA-256 of the
sorted ids) so a record names exactly which examples were removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from safeedit.config import Seed
from safeedit.data.sources import matching_rows, parse_conditions
from safeedit.errors import SafeEditError


class ForgetRequest(BaseModel):
    """What to forget: `kind: class` with `label`, `kind: random` with `fraction`, or `kind: ids` with `ids`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["class", "random", "ids", "where"]
    label: int | None = None
    fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    ids: list[int | str] | None = Field(default=None, min_length=1)
    column: str = Field(default="id", description="the column `ids` are looked up in")
    where: dict[str, int | float | str] | str | None = Field(
        default=None, description="rows to forget: {column: value, ...} or 'column=value,column!=value'")
    seed: Seed = 0

    @model_serializer(mode="wrap")
    def _stated(self, handler: Any) -> dict[str, Any]:
        """The request as stated: `column` and `where` only when used (records of id-column requests stay as
        they were)."""
        data = handler(self)
        if data.get("column") == "id":
            data.pop("column")
        if data.get("where") is None:
            data.pop("where", None)
        return data

    def conditions(self) -> tuple[tuple[str, str, str], ...]:
        """The `where` filter as (column, op, value) triples."""
        if isinstance(self.where, str):
            return parse_conditions(self.where, "forget.where")
        return tuple((column, "=", str(value)) for column, value in (self.where or {}).items())

    @model_validator(mode="after")
    def _one_selector(self) -> ForgetRequest:
        if self.seed != 0 and self.kind != "random":
            raise ValueError(f"forget kind '{self.kind}' does not read 'seed' (it picks no rows at random); remove it")
        if self.column != "id" and self.kind != "ids":
            raise ValueError(f"forget kind '{self.kind}' does not read 'column'; it names where 'ids' are looked up")
        selectors = {"class": "label", "random": "fraction", "ids": "ids", "where": "where"}
        needed = selectors[self.kind]
        if getattr(self, needed) is None:
            raise ValueError(f"forget kind '{self.kind}' needs '{needed}'")
        other = next((key for key in selectors.values() if key != needed and getattr(self, key) is not None), None)
        if other is not None:  # which one would win is a guess: say so instead
            raise ValueError(f"forget kind '{self.kind}' selects by '{needed}', not '{other}'; remove '{other}' "
                             f"or change the kind")
        return self


@dataclass(frozen=True)
class ForgetSplit:
    forget: Dataset
    retain: Dataset

    def fingerprints(self) -> dict[str, dict]:
        return {"forget": fingerprint(self.forget), "retain": fingerprint(self.retain)}


def fingerprint(dataset: Dataset) -> dict:
    """Count and SHA-256 of the sorted example ids (integers, or strings such as "en:<title>")."""
    raw = list(dataset["id"])
    ids = sorted(int(i) for i in raw) if all(isinstance(i, int | np.integer) for i in raw) else sorted(map(str, raw))
    return {"count": len(ids), "ids_sha256": hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()}


def split_forget(train: Dataset, request: ForgetRequest) -> ForgetSplit:
    if "id" not in train.column_names:
        raise SafeEditError("the training data needs an 'id' column to name forgotten examples; add row ids")
    ids = np.asarray(train["id"])
    if len(np.unique(ids)) != len(ids):
        raise SafeEditError("the training data has duplicate ids; ids must name examples uniquely")
    if request.kind == "class":
        labels = np.asarray(train["label"])
        forget = labels == request.label
    elif request.kind == "random":
        rng = np.random.default_rng(request.seed)
        count = round(request.fraction * len(ids))
        forget = np.zeros(len(ids), dtype=bool)
        forget[rng.choice(len(ids), size=count, replace=False)] = True
    elif request.kind == "ids":
        forget = _rows_with_ids(train, request.column, request.ids)
    else:
        forget = matching_rows(train, request.conditions(), "the training data (forget.where)")
    if not forget.any():
        raise SafeEditError(f"the forget request {request.model_dump(exclude_none=True)} selects no example")
    if forget.all():
        raise SafeEditError("the forget request selects every training example; nothing would be left to retain")
    return ForgetSplit(train.select(np.flatnonzero(forget)), train.select(np.flatnonzero(~forget)))


def _rows_with_ids(train: Dataset, column: str, wanted: list[int | str]) -> np.ndarray:
    """Rows whose `column` holds one of `wanted`; ids are compared as text when the column holds text."""
    if column not in train.column_names:
        raise SafeEditError(f"forget.column {column!r} is not a column of the training data; columns: "
                            f"{', '.join(train.column_names)}")
    values = np.asarray(train[column])
    as_text = not np.issubdtype(values.dtype, np.number)
    keys = values.astype(str) if as_text else values
    wanted_keys = np.asarray([str(w) for w in wanted]) if as_text else np.asarray(wanted)
    if not as_text and wanted_keys.dtype.kind not in "iuf":
        raise SafeEditError(f"forget ids {wanted[:5]} are text but column {column!r} holds numbers")
    unknown = sorted(set(wanted_keys.tolist()) - set(keys.tolist()), key=str)
    if unknown:
        raise SafeEditError(f"forget ids {unknown[:5]} are not in the training data (column {column!r})")
    return np.isin(keys, wanted_keys)
