"""Classification unlearning metrics on hand-checkable inputs: models whose logits are the inputs themselves."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeedit.errors import SafeEditError
from safeedit.eval.classification import (
    Predictions,
    accuracy,
    classification_metrics,
    gap_to_retrain,
    mia_auc,
    mia_efficacy,
    mia_is_informative,
    predictions,
    true_label_confidence,
    true_label_log_odds,
)


class LogitsAreInputs(nn.Module):
    """forward(pixel_values) returns the inputs as logits; records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so the model has a device
        self.seen_training: list[bool] = []

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return pixel_values * self.scale


@dataclass
class Output:
    logits: torch.Tensor


class WithLogitsAttr(nn.Module):
    def forward(self, x: torch.Tensor) -> Output:
        return Output(logits=x)


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def pred_from_conf(conf: torch.Tensor) -> Predictions:
    """Two-class predictions whose true label (1) has confidence `conf`."""
    conf = conf.float()
    return Predictions(torch.stack([1 - conf, conf], dim=1), torch.ones(len(conf), dtype=torch.long))


PROBS = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.25, 0.5, 0.25]]
LABELS = [0, 2, 2, 0]  # argmax 0,1,2,1 -> correct, wrong, correct, wrong: accuracy 1/2


def test_predictions_dict_batches_with_label_key():
    model = LogitsAreInputs()
    x, y = logits_for(PROBS), torch.tensor(LABELS)
    loader = [{"pixel_values": x[:3], "label": y[:3], "id": torch.arange(3)}, {"pixel_values": x[3:], "label": y[3:]}]
    pred = predictions(model, loader)
    assert pred.probs.dtype == torch.float32 and pred.labels.dtype == torch.int64
    torch.testing.assert_close(pred.probs, torch.tensor(PROBS), atol=1e-6, rtol=0)
    assert pred.labels.tolist() == LABELS
    assert accuracy(pred) == 0.5
    torch.testing.assert_close(true_label_confidence(pred), torch.tensor([0.7, 0.3, 0.5, 0.25]), atol=1e-6, rtol=0)


def test_predictions_labels_key_and_tuple_batches_agree():
    x, y = logits_for(PROBS), torch.tensor(LABELS)
    from_dict = predictions(LogitsAreInputs(), [{"pixel_values": x, "labels": y}])
    from_pairs = predictions(nn.Identity(), DataLoader(TensorDataset(x, y), batch_size=3))
    from_output = predictions(WithLogitsAttr(), [(x, y)])
    for pred in (from_pairs, from_output):
        torch.testing.assert_close(pred.probs, from_dict.probs)
        assert pred.labels.tolist() == LABELS


def test_log_odds_from_logits_match_probs_and_stay_exact_near_one():
    x, y = logits_for(PROBS), torch.tensor(LABELS)
    pred = predictions(nn.Identity(), [(x, y)])
    p = torch.tensor([0.7, 0.3, 0.5, 0.25], dtype=torch.float64)
    expected = torch.log(p / (1 - p)).numpy()
    assert true_label_log_odds(pred) == pytest.approx(expected, abs=1e-6)
    without = Predictions(pred.probs, pred.labels)  # derived from probs instead
    assert true_label_log_odds(without) == pytest.approx(expected, abs=1e-5)
    # float32 softmax saturates at 1.0 for margins 20 and 25; the log-odds from the logits still rank them
    sharp = predictions(nn.Identity(), [(torch.tensor([[20.0, 0.0], [25.0, 0.0]]), torch.tensor([0, 0]))])
    assert sharp.probs[:, 0].tolist() == [1.0, 1.0]
    assert true_label_log_odds(sharp) == pytest.approx([20.0, 25.0])


def test_model_mode_restored_and_eval_used():
    model = LogitsAreInputs().train()
    predictions(model, [{"pixel_values": logits_for(PROBS), "label": torch.tensor(LABELS)}])
    assert model.seen_training == [False] and model.training
    model.eval()
    predictions(model, [{"pixel_values": logits_for(PROBS), "label": torch.tensor(LABELS)}])
    assert not model.training
    model.train()
    with pytest.raises(SafeEditError, match="label"):
        predictions(model, [{"pixel_values": logits_for(PROBS)}])
    assert model.training


def test_classification_metrics_by_hand():
    model = LogitsAreInputs()
    forget = [(logits_for(PROBS), torch.tensor(LABELS))]  # accuracy 1/2
    retain = [{"pixel_values": logits_for([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), "label": torch.tensor([0, 1, 0])}]
    test_logits = logits_for([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.35, 0.65]])
    test = [{"pixel_values": test_logits, "label": torch.tensor([0, 0, 1, 1])}]
    # forget has 3 classes, retain/test 2: fine, only the true-label confidence crosses sets
    metrics = classification_metrics(model, forget, retain, test, seed=0)
    assert metrics["ua"] == 0.5
    assert metrics["ra"] == 1.0
    assert metrics["ta"] == 0.5  # correct: ex 0 and ex 3
    assert (metrics["n_forget"], metrics["n_retain"], metrics["n_test"]) == (4, 3, 4)
    assert all(isinstance(metrics[k], int) for k in ("n_forget", "n_retain", "n_test", "mia_train_size"))
    assert metrics["mia_train_size"] == 6
    for key in ("ua", "ra", "ta", "mia_efficacy", "mia_attack_accuracy", "mia_auc", "mia_auc_retain_vs_test"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
    # retain true-label confidences 0.9, 0.8, 0.6 vs test 0.9, 0.2, 0.4, 0.65: pairs won 3.5 + 3 + 2 of 12
    assert metrics["mia_auc_retain_vs_test"] == pytest.approx(8.5 / 12)
    # forget 0.7, 0.3, 0.5, 0.25 vs the same test: pairs won 3 + 1 + 2 + 1 of 16
    assert metrics["mia_auc"] == pytest.approx(7 / 16)


def test_mia_auc_hand_example():
    forget = pred_from_conf(torch.tensor([0.9, 0.6, 0.3]))
    test = pred_from_conf(torch.tensor([0.8, 0.5, 0.2]))
    # forget beats test in 3 + 2 + 1 = 6 of 9 pairs
    result = mia_auc(forget, forget, test)
    assert result["mia_auc"] == pytest.approx(6 / 9)
    assert result["mia_auc_retain_vs_test"] == pytest.approx(6 / 9)
    # clipping keeps p = 0 and p = 1 finite, and the ordering survives
    extremes = mia_auc(
        pred_from_conf(torch.tensor([1.0])),
        pred_from_conf(torch.tensor([1.0])),
        pred_from_conf(torch.tensor([0.0, 0.5])),
    )
    assert extremes["mia_auc"] == 1.0


def _uniform(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=g)


def test_mia_efficacy_separable_confidences():
    retain = pred_from_conf(_uniform(300, 0.95, 1.0, 1))
    test = pred_from_conf(_uniform(300, 0.4, 0.6, 2))
    remembered = mia_efficacy(pred_from_conf(_uniform(100, 0.95, 1.0, 3)), retain, test)
    forgotten = mia_efficacy(pred_from_conf(_uniform(100, 0.4, 0.6, 4)), retain, test)
    assert remembered["mia_attack_accuracy"] >= 0.99 and forgotten["mia_attack_accuracy"] >= 0.99
    assert remembered["mia_efficacy"] <= 0.01
    assert forgotten["mia_efficacy"] >= 0.99
    assert mia_is_informative(remembered)
    auc = mia_auc(pred_from_conf(_uniform(100, 0.4, 0.6, 4)), retain, test)
    assert auc["mia_auc_retain_vs_test"] == 1.0 and 0.35 < auc["mia_auc"] < 0.65


def test_mia_identical_distributions_have_no_power():
    retain = pred_from_conf(_uniform(400, 0.0, 1.0, 5))
    test = pred_from_conf(_uniform(400, 0.0, 1.0, 6))
    result = mia_efficacy(pred_from_conf(_uniform(100, 0.0, 1.0, 7)), retain, test)
    assert 0.4 <= result["mia_attack_accuracy"] <= 0.6
    assert mia_is_informative(result, margin=0.1) is False
    assert 0.4 <= mia_auc(retain, retain, test)["mia_auc_retain_vs_test"] <= 0.6


def test_mia_subsampling_cap_and_seeded_determinism():
    retain = pred_from_conf(_uniform(300, 0.5, 1.0, 8))
    test = pred_from_conf(_uniform(100, 0.3, 0.9, 9))
    forget = pred_from_conf(_uniform(50, 0.4, 1.0, 10))
    assert mia_efficacy(forget, retain, test)["mia_train_size"] == 200  # min(300, 100) per side
    assert mia_efficacy(forget, retain, test, max_examples=40)["mia_train_size"] == 80
    first = mia_efficacy(forget, retain, test, seed=3, max_examples=40)
    assert first == mia_efficacy(forget, retain, test, seed=3, max_examples=40)
    with pytest.raises(SafeEditError, match="max_examples"):
        mia_efficacy(forget, retain, test, max_examples=0)


def test_gap_to_retrain_by_hand():
    run = {"ua": 0.1, "ra": 0.9, "ta": 0.8, "mia_efficacy": 0.5, "extra": 7.0}
    retrain = {"ua": 0.2, "ra": 0.95, "ta": 0.8, "mia_efficacy": 0.3}
    assert gap_to_retrain(run, retrain) == pytest.approx((0.1 + 0.05 + 0.0 + 0.2) / 4)
    assert gap_to_retrain(run, retrain, keys=("ua",)) == pytest.approx(0.1)
    with pytest.raises(SafeEditError, match="extra"):
        gap_to_retrain(run, retrain, keys=("ua", "extra"))


def test_empty_sets_are_refused():
    empty = predictions(nn.Identity(), [])
    assert len(empty) == 0
    some = pred_from_conf(torch.tensor([0.5, 0.6]))
    with pytest.raises(SafeEditError, match="empty"):
        accuracy(empty)
    with pytest.raises(SafeEditError, match="forget set is empty"):
        mia_efficacy(empty, some, some)
    assert not math.isnan(accuracy(some))
