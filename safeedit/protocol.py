"""Tune on some seeds (or data splits), report on others, with the same budget for every method.

The protocol of every benchmark (benchmarks/README.md) and of any fair comparison of methods:

    for each method:   every configuration of its grid  x  every *tune* unit   ->  trials
                       a rule fixed in advance picks one configuration from those trials only
                       the chosen configuration  x  every *report* unit        ->  the reported rows

A unit is whatever makes a run differ (a seed, a data split, a forget set); tune and report units are disjoint,
and every method's grid has the same number of configurations (the same search budget), or `tune_then_report`
refuses to start. A grid of one configuration is not tuned at all: the tune units are not touched.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from safeedit.errors import SafeEditError

Config = Mapping[str, Any]
Row = TypeVar("Row")


@dataclass(frozen=True)
class Protocol:
    """Which units may be looked at to choose (`tune`) and which are reported (`report`); never both."""

    tune: tuple[Hashable, ...]
    report: tuple[Hashable, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tune", tuple(self.tune))
        object.__setattr__(self, "report", tuple(self.report))
        if not self.report:
            raise SafeEditError("no report seeds or splits given; name at least one")
        shared = sorted(set(self.tune) & set(self.report), key=str)
        if shared:
            raise SafeEditError(f"{', '.join(map(str, shared))} both tune and report; a reported seed or split may "
                                "never be used to choose a configuration: give disjoint ones")


@dataclass
class Candidate(Generic[Row]):
    """One configuration of a method's grid and its trials on the tune units (in their order)."""

    config: Config
    trials: list[Row] = field(default_factory=list)


@dataclass
class Outcome(Generic[Row]):
    """A method's tuning (`candidates`), its chosen configuration, and its rows on the report units."""

    candidates: list[Candidate[Row]]
    chosen: Config
    reported: list[Row]


Trial = Callable[[str, Config, Hashable, str], Row]  # (method, config, unit, "tune" | "report") -> a row
Rule = Callable[[list[Candidate[Row]]], int]  # the index of the chosen candidate


def search_budget(grids: Mapping[str, Sequence[Config]]) -> int:
    """The number of configurations every method may try; refuses unequal budgets and repeated configurations."""
    sizes = {method: len(grid) for method, grid in grids.items()}
    if not sizes:
        raise SafeEditError("no methods to compare; give at least one grid")
    if min(sizes.values()) < 1 or len(set(sizes.values())) > 1:
        raise SafeEditError("unequal search budgets (" + ", ".join(f"{m}: {n}" for m, n in sizes.items())
                            + " configurations); give every method the same number of configurations")
    for method, grid in grids.items():
        seen = [dict(config) for config in grid]
        if any(seen[i] == seen[j] for i in range(len(seen)) for j in range(i)):
            raise SafeEditError(f"the grid of {method} repeats a configuration; every try must be a different one")
    return next(iter(sizes.values()))


def tune_then_report(grids: Mapping[str, Sequence[Config]], protocol: Protocol, trial: Trial,
                     rule: Rule) -> dict[str, Outcome]:
    """Tune every method on `protocol.tune` with `rule`, then run its choice on `protocol.report` (see module)."""
    search_budget(grids)
    outcomes: dict[str, Outcome] = {}
    for method, grid in grids.items():
        if len(grid) == 1:  # nothing to choose: the tune units stay unseen
            candidates, chosen = [Candidate(grid[0])], grid[0]
        else:
            candidates = [Candidate(config, [trial(method, config, unit, "tune") for unit in protocol.tune])
                          for config in grid]
            chosen = grid[rule(candidates)]
        outcomes[method] = Outcome(candidates, chosen, [trial(method, chosen, unit, "report")
                                                        for unit in protocol.report])
    return outcomes


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def mean_of(values: Sequence[float | None]) -> float:
    """The mean of the finite values (a failed or diverged trial is None or NaN); NaN when none is finite."""
    finite = [v for v in map(_finite, values) if v is not None]
    return statistics.fmean(finite) if finite else math.nan


def lowest_mean(metric: Callable[[Row], float | None]) -> Rule:
    """Choose the candidate with the smallest mean `metric` over its trials; a failed trial counts as +inf (the
    candidate loses); ties go to the first candidate of the grid."""
    def rule(candidates: list[Candidate[Row]]) -> int:
        def key(i: int) -> float:
            values = [_finite(metric(row)) for row in candidates[i].trials]
            return math.inf if any(v is None for v in values) else statistics.fmean(values)
        return min(range(len(candidates)), key=key)
    return rule


def highest_mean(metric: Callable[[Row], float | None]) -> Rule:
    """Choose the candidate with the largest mean `metric` (a failed trial counts as -inf; ties: the first)."""
    def negated(row: Row) -> float | None:
        value = _finite(metric(row))
        return None if value is None else -value
    return lowest_mean(negated)


@dataclass(frozen=True)
class Spread:
    """Median, range, mean and sample standard deviation of the finite values among `values`."""

    n: int
    median: float
    low: float
    high: float
    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        finite = [v for v in map(_finite, values) if v is not None]
        if not finite:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        std = statistics.stdev(finite) if len(finite) > 1 else 0.0
        return cls(len(finite), statistics.median(finite), min(finite), max(finite), statistics.fmean(finite), std)

    def mean_std(self, scale: float = 1.0, digits: int = 2) -> str:
        """`mean ± std` scaled (e.g. 100 for percent); `n/a` when no value was finite."""
        if not self.n:
            return "n/a"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.std:.{digits}f}"

    def median_range(self, scale: float = 1.0, digits: int = 2) -> str:
        """`median [low, high]` scaled; `n/a` when no value was finite."""
        if not self.n:
            return "n/a"
        return f"{scale * self.median:.{digits}f} [{scale * self.low:.{digits}f}, {scale * self.high:.{digits}f}]"
