"""Forget requests: which training examples must go. The rest of the training set is the retain set.

Three kinds, as a user states them: every example of one class (`class`), a seeded random share of the
training set (`random`), or a list of example ids (`ids`, e.g. one person's records). Forget and retain are
disjoint by construction and each must be non-empty; both are fingerprinted (count and SHA-256 of the sorted
ids) so a record names exactly which examples were removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field, model_validator

from safeedit.config import Seed
from safeedit.errors import SafeEditError


class ForgetRequest(BaseModel):
    """What to forget: `kind: class` with `label`, `kind: random` with `fraction`, or `kind: ids` with `ids`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["class", "random", "ids"]
    label: int | None = None
    fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    ids: list[int] | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _one_selector(self) -> ForgetRequest:
        selectors = {"class": "label", "random": "fraction", "ids": "ids"}
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
    else:
        unknown = set(request.ids) - set(ids.tolist())
        if unknown:
            raise SafeEditError(f"forget ids {sorted(unknown)[:5]} are not in the training data")
        forget = np.isin(ids, request.ids)
    if not forget.any():
        raise SafeEditError(f"the forget request {request.model_dump(exclude_none=True)} selects no example")
    if forget.all():
        raise SafeEditError("the forget request selects every training example; nothing would be left to retain")
    return ForgetSplit(train.select(np.flatnonzero(forget)), train.select(np.flatnonzero(~forget)))
