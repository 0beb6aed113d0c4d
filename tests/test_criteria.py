"""Scenario criteria: parsing, evaluation against results, and the verdict they give."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from safeedit.criteria import Criterion, check_names, verdict
from safeedit.errors import SafeEditError

RESULTS = {
    "retrain": {"metrics": {"after": {"ua": 1.0, "ta": 0.90}}},
    "salun": {"metrics": {"before": {"ua": 0.0}, "after": {"ua": 0.985, "ta": 0.885, "gap_to_retrain": 0.03}}},
    "npo+wagle": {"metrics": {"after": {"forget_quality": float("nan")}}},
}


@pytest.mark.parametrize(
    ("check", "measured", "threshold", "passed"),
    [
        ("salun.ua >= 99%", 0.985, 0.99, False),
        ("salun.ua >= 0.98", 0.985, 0.98, True),
        ("salun.ua > 98.5%", 0.985, 0.985, False),
        ("salun.gap_to_retrain <= 3%", 0.03, 0.03, True),
        ("salun.ta >= retrain.ta - 2%", 0.885, 0.88, True),
        ("salun.ta >= retrain.ta - 1%", 0.885, 0.89, False),
        ("salun.ta<retrain.ta+1e-2", 0.885, 0.91, True),
        ("salun.ua == retrain.ua", 0.985, 1.0, False),
        ("salun.ta >= retrain.ta * 0.95", 0.885, 0.855, True),
        ("salun.ta >= retrain.ta*0.99", 0.885, 0.891, False),
    ],
)
def test_criterion_compares_the_after_value(check, measured, threshold, passed):
    row = Criterion.model_validate(check).evaluate(RESULTS)
    assert row["measured"] == pytest.approx(measured)
    assert row["threshold"] == pytest.approx(threshold)
    assert row["passed"] is passed
    assert row["result"] == "salun"


def test_unmeasured_metric_fails_with_a_note():
    for check in ("salun.mia_efficacy >= 0.9", "npo+wagle.forget_quality >= 0.05", "ghost.ua >= 0",
                  "salun.ua >= retrain.mia_auc"):
        row = Criterion.model_validate(check).evaluate(RESULTS)
        assert row["passed"] is False
        assert "was not measured" in row["note"]


def test_mapping_form_keeps_why_and_rejects_unknown_keys():
    criterion = Criterion.model_validate({"check": "salun.ua >= 0.5", "why": "the 3s are gone"})
    assert criterion.evaluate(RESULTS)["why"] == "the 3s are gone"
    with pytest.raises(ValidationError, match="Extra inputs"):
        Criterion.model_validate({"check": "salun.ua >= 0.5", "becuase": "typo"})


@pytest.mark.parametrize("bad", ["salun ua >= 1", "salun.ua => 1", "salun.ua >= ", "ua >= 1", "salun.ua >= x%",
                                 "salun.ua >= retrain.ua / 2"])
def test_malformed_criteria_are_rejected(bad):
    with pytest.raises(ValidationError, match=re.escape("is not '<result>.<metric> <op> <value>'")):
        Criterion.model_validate(bad)


def test_verdict_passes_only_when_every_criterion_passes():
    passing = [Criterion.model_validate("salun.ua >= 0.9"), Criterion.model_validate("salun.ta >= 0.8")]
    assert verdict(passing, RESULTS)["passed"] is True
    failing = [*passing, Criterion.model_validate("salun.ua >= 0.99")]
    result = verdict(failing, RESULTS)
    assert result["passed"] is False
    assert [row["passed"] for row in result["criteria"]] == [True, True, False]
    assert verdict([], RESULTS) == {"passed": None, "criteria": []}


def test_check_names_rejects_results_the_scenario_does_not_produce():
    check_names([Criterion.model_validate("salun.ta >= retrain.ta - 1%")], {"original", "retrain", "salun"})
    with pytest.raises(SafeEditError, match="names 'retrain', which this scenario does not produce"):
        check_names([Criterion.model_validate("salun.ta >= retrain.ta")], {"original", "salun"})
