"""The tune-then-report protocol: choices see only tune units, budgets are equal, rules pick by hand-checked means."""

from __future__ import annotations

import math

import pytest

from safeedit.errors import SafeEditError
from safeedit.protocol import Protocol, Spread, highest_mean, lowest_mean, search_budget, tune_then_report

# A made-up score table: (method, lr, unit) -> loss. Unit 9 is a report unit whose numbers would flip the choice.
LOSS = {("a", 0.1, 1): 3.0, ("a", 0.1, 2): 1.0, ("a", 0.3, 1): 1.0, ("a", 0.3, 2): 2.0,
        ("b", 0.1, 1): 5.0, ("b", 0.1, 2): math.nan, ("b", 0.3, 1): 7.0, ("b", 0.3, 2): 8.0}
REPORT_LOSS = {("a", 0.1): 0.0, ("a", 0.3): 9.0, ("b", 0.1): 0.0, ("b", 0.3): 9.0}


def test_choice_uses_tune_units_only_and_report_runs_the_choice():
    calls = []

    def trial(method, config, unit, phase):
        calls.append((method, config["lr"], unit, phase))
        if phase == "report":
            return {"loss": REPORT_LOSS[method, config["lr"]]}
        return {"loss": LOSS[method, config["lr"], unit]}

    grids = {m: [{"lr": 0.1}, {"lr": 0.3}] for m in ("a", "b")}
    outcomes = tune_then_report(grids, Protocol(tune=(1, 2), report=(9,)), trial, lowest_mean(lambda r: r["loss"]))
    # a: mean 2.0 (lr 0.1) vs 1.5 (lr 0.3) -> 0.3, although the report unit favours 0.1
    assert outcomes["a"].chosen == {"lr": 0.3} and outcomes["a"].reported == [{"loss": 9.0}]
    # b: lr 0.1 has a diverged (NaN) tune trial, so it loses to lr 0.3's mean of 7.5
    assert outcomes["b"].chosen == {"lr": 0.3}
    assert [c.trials for c in outcomes["a"].candidates] == [[{"loss": 3.0}, {"loss": 1.0}],
                                                            [{"loss": 1.0}, {"loss": 2.0}]]
    assert {unit for *_, unit, phase in calls if phase == "tune"} == {1, 2}
    assert {unit for *_, unit, phase in calls if phase == "report"} == {9}
    assert len(calls) == 2 * (2 * 2 + 1)


def test_highest_mean_and_ties_go_to_the_first_configuration():
    grids = {"m": [{"k": 1}, {"k": 2}, {"k": 3}]}
    scores = {1: 0.5, 2: 0.7, 3: 0.7}
    outcomes = tune_then_report(grids, Protocol(tune=(0,), report=(1,)),
                                lambda m, c, u, p: scores[c["k"]], highest_mean(lambda row: row))
    assert outcomes["m"].chosen == {"k": 2}


def test_a_single_configuration_is_not_tuned():
    seen = []
    outcomes = tune_then_report({"m": [{"lr": 1.0}]}, Protocol(tune=(0,), report=(1, 2)),
                                lambda m, c, u, p: seen.append((u, p)) or u, lowest_mean(lambda row: row))
    assert seen == [(1, "report"), (2, "report")]
    assert outcomes["m"].reported == [1, 2] and outcomes["m"].candidates[0].trials == []


@pytest.mark.parametrize("tune, report, words", [((1, 2), (2, 3), "2 both tune and report"),
                                                 ((1,), (), "no report")])
def test_overlapping_or_missing_units_are_refused(tune, report, words):
    with pytest.raises(SafeEditError, match=words):
        Protocol(tune=tune, report=report)


def test_unequal_budgets_and_repeated_configurations_are_refused():
    assert search_budget({"a": [{"lr": 1}, {"lr": 2}], "b": [{"lr": 1}, {"lr": 3}]}) == 2
    with pytest.raises(SafeEditError, match="unequal search budgets"):
        search_budget({"a": [{"lr": 1}, {"lr": 2}], "b": [{"lr": 1}]})
    with pytest.raises(SafeEditError, match="repeats a configuration"):
        search_budget({"a": [{"lr": 1}, {"lr": 1}]})


def test_spread_of_finite_values():
    spread = Spread.of([1.0, None, 3.0, math.nan, 2.0])
    assert (spread.n, spread.median, spread.low, spread.high, spread.mean) == (3, 2.0, 1.0, 3.0, 2.0)
    assert spread.std == pytest.approx(1.0)  # sample standard deviation of 1, 2, 3
    assert spread.mean_std(100, 1) == "200.0 ± 100.0" and spread.median_range() == "2.00 [1.00, 3.00]"
    assert Spread.of([None]).mean_std() == "n/a"
