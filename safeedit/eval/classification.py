"""Classification metrics of machine unlearning (SalUn, Fan et al. 2024), stored as fractions in [0, 1].

- ``ua`` = 1 − accuracy on the forget set; ``ra`` / ``ta`` = accuracy on the retain / test set.
- ``mia_efficacy``: SalUn's confidence-based membership-inference attack. An RBF SVC (``C=3, gamma="auto"``, as
  in the SalUn and "Model sparsity" reference code) is trained on ONE feature, the softmax probability of the
  true label, with retain examples as members (label 1) and test examples as non-members (label 0), in equal
  counts; efficacy = share of forget examples it predicts non-member. Higher = the forget set looks unseen.
  ``mia_attack_accuracy`` is the SVC's accuracy on its own balanced training data: near 0.5 the attack cannot
  tell members from non-members at all, and the efficacy carries no information (see `mia_is_informative`).
- ``mia_auc``: a threshold attack on the log-odds of the true-label confidence, log(p / (1 − p)), scored by
  ROC-AUC for separating forget examples (positives) from test examples (negatives). ≈ 0.5 means the forget
  examples look like unseen data; ≈ 1 means they still look like training data. ``mia_auc_retain_vs_test`` is the
  same attack on retain vs test, i.e. its power on known members: if that is also ≈ 0.5 the attack is powerless
  on this model and ``mia_auc`` ≈ 0.5 proves nothing.

Cost: the SVC is quadratic in its training size, so retain and test are each subsampled (seeded, without
replacement) to n = min(len(retain), len(test), max_examples) examples; ``mia_train_size`` = 2n. The forget set
is never subsampled, and the AUCs use every example (they are only a sort).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.svm import SVC
from torch import nn

from safeedit.batches import default_forward, labels_of, logits_of, to_device
from safeedit.errors import SafeEditError

SVC_C = 3.0
SVC_GAMMA = "auto"  # 1 / n_features = 1 for the single confidence feature
CONFIDENCE_EPS = 1e-12  # p is clipped to [eps, 1 - eps] before the log-odds
_MAX_LOG_ODDS = math.log((1 - CONFIDENCE_EPS) / CONFIDENCE_EPS)
GAP_KEYS: tuple[str, ...] = ("ua", "ra", "ta", "mia_efficacy")


@dataclass
class Predictions:
    """Softmax outputs of a classifier on a data set, on the CPU.

    `probs` is float32 [N, C], `labels` int64 [N]. `log_odds` (float64 [N], optional) is the true-label log-odds
    computed from the logits in float64, so confidences that round to 1.0 in float32 still rank correctly;
    when absent (e.g. hand-built predictions) it is derived from `probs`.
    """

    probs: torch.Tensor
    labels: torch.Tensor
    log_odds: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _true_log_odds_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    rows = torch.arange(len(labels))
    others = logits.clone()
    others[rows, labels] = -math.inf
    log_odds = logits[rows, labels] - torch.logsumexp(others, dim=-1)
    return log_odds.clamp(-_MAX_LOG_ODDS, _MAX_LOG_ODDS)


@torch.no_grad()
def predictions(model: nn.Module, loader: Iterable[Any]) -> Predictions:
    """Softmax probabilities and labels of every example in `loader`, with the model in eval mode.

    Batches are dicts (labels under 'label' or 'labels'; keys the model does not accept are dropped) or
    (inputs, targets) pairs; outputs may carry `.logits` or be the logits. The model's train/eval mode is restored.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    log_odds: list[torch.Tensor] = []
    try:
        for batch in loader:
            batch_labels = torch.as_tensor(labels_of(batch)).reshape(-1).long().cpu()
            logits = logits_of(default_forward(model, to_device(batch, device))).detach().float().cpu()
            if logits.ndim != 2 or logits.shape[0] != batch_labels.numel():
                raise SafeEditError(
                    f"expected logits of shape [batch, classes] = [{batch_labels.numel()}, C], "
                    f"got {tuple(logits.shape)}"
                )
            if batch_labels.numel() and (batch_labels.min() < 0 or batch_labels.max() >= logits.shape[1]):
                raise SafeEditError(f"labels must lie in [0, {logits.shape[1]}) for {logits.shape[1]} classes")
            probs.append(logits.softmax(dim=-1))
            labels.append(batch_labels)
            log_odds.append(_true_log_odds_from_logits(logits, batch_labels))
    finally:
        model.train(was_training)
    if not probs:
        return Predictions(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64))
    return Predictions(torch.cat(probs), torch.cat(labels), torch.cat(log_odds))


def _require_examples(pred: Predictions, name: str) -> None:
    if len(pred) == 0:
        raise SafeEditError(f"the {name} set is empty; its metrics are undefined")


def accuracy(pred: Predictions) -> float:
    """Share of examples whose argmax prediction equals the label."""
    _require_examples(pred, "evaluated")
    return float((pred.probs.argmax(dim=-1) == pred.labels).double().mean())


def true_label_confidence(pred: Predictions) -> torch.Tensor:
    """Softmax probability of the true label, per example (float32 [N]): the membership signal."""
    return pred.probs[torch.arange(len(pred)), pred.labels]


def true_label_log_odds(pred: Predictions) -> np.ndarray:
    """log(p / (1 − p)) of the true-label confidence p (clipped to [1e-12, 1 − 1e-12]), float64 [N]."""
    if pred.log_odds is not None:
        return pred.log_odds.double().numpy()
    p = true_label_confidence(pred).double().clamp(CONFIDENCE_EPS, 1 - CONFIDENCE_EPS)
    return torch.log(p / (1 - p)).numpy()


def mia_efficacy(
    forget: Predictions, retain: Predictions, test: Predictions, seed: int = 0, max_examples: int = 5000
) -> dict[str, float]:
    """SalUn's MIA-efficacy: share of forget examples an SVC trained on retain-vs-test confidences calls non-member.

    The SVC sees retain (members, 1) and test (non-members, 0) examples in equal counts, each subsampled with
    `seed` to n = min(len(retain), len(test), max_examples). Returns ``mia_efficacy``, ``mia_attack_accuracy``
    (accuracy on its balanced training data; ≈ 0.5 = no attack power) and ``mia_train_size`` (= 2n).
    """
    for pred, name in ((forget, "forget"), (retain, "retain"), (test, "test")):
        _require_examples(pred, name)
    if max_examples < 1:
        raise SafeEditError(f"max_examples must be at least 1, got {max_examples}")
    n = min(len(retain), len(test), max_examples)
    rng = np.random.default_rng(seed)
    member = true_label_confidence(retain).double().numpy()
    non_member = true_label_confidence(test).double().numpy()
    member = member[np.sort(rng.choice(len(member), size=n, replace=False))]
    non_member = non_member[np.sort(rng.choice(len(non_member), size=n, replace=False))]
    x = np.concatenate([member, non_member]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    svc = SVC(C=SVC_C, gamma=SVC_GAMMA, kernel="rbf")
    svc.fit(x, y)
    attack_accuracy = float((svc.predict(x) == y).mean())
    forget_x = true_label_confidence(forget).double().numpy().reshape(-1, 1)
    efficacy = float((svc.predict(forget_x) == 0).mean())
    return {"mia_efficacy": efficacy, "mia_attack_accuracy": attack_accuracy, "mia_train_size": 2 * n}


def _log_odds_auc(positives: Predictions, negatives: Predictions) -> float:
    scores = np.concatenate([true_label_log_odds(positives), true_label_log_odds(negatives)])
    targets = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    return float(roc_auc_score(targets, scores))


def mia_auc(forget: Predictions, retain: Predictions, test: Predictions) -> dict[str, float]:
    """Threshold attack on the true-label log-odds, as ROC-AUC (all examples, no subsampling).

    ``mia_auc``: forget (positives) vs test (negatives); ≈ 0.5 = forget examples look like unseen data.
    ``mia_auc_retain_vs_test``: retain vs test, the attack's power on known members; ≈ 0.5 there means the
    attack has no power on this model and ``mia_auc`` says nothing.
    """
    for pred, name in ((forget, "forget"), (retain, "retain"), (test, "test")):
        _require_examples(pred, name)
    return {"mia_auc": _log_odds_auc(forget, test), "mia_auc_retain_vs_test": _log_odds_auc(retain, test)}


def forget_vs_test_auc(forget: Predictions, test: Predictions) -> float:
    """`mia_auc` alone (forget vs test), for re-measuring after an attack without a pass over the retain set."""
    return _log_odds_auc(forget, test)


HISTOGRAM_BINS = 20
ROC_POINTS = 101


def _roc(positives: Predictions, negatives: Predictions) -> dict[str, list[float]]:
    """The log-odds attack's ROC curve, TPR interpolated on an even grid of ROC_POINTS false-positive rates."""
    scores = np.concatenate([true_label_log_odds(positives), true_label_log_odds(negatives)])
    targets = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    fpr, tpr, _ = roc_curve(targets, scores)
    grid = np.linspace(0.0, 1.0, ROC_POINTS)
    return {"fpr": [round(float(x), 6) for x in grid], "tpr": [round(float(y), 6) for y in np.interp(grid, fpr, tpr)]}


def classification_evidence(forget: Predictions, retain: Predictions, test: Predictions) -> dict[str, Any]:
    """What a report plots, small enough for the record: true-label confidence histograms (counts in
    HISTOGRAM_BINS equal bins of [0, 1]) per set, and the ROC curves of the log-odds membership attack
    (forget vs test, and retain vs test as the attack's power on known members)."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    histogram = {"edges": [round(float(e), 6) for e in edges]}
    for pred, name in ((forget, "forget"), (retain, "retain"), (test, "test")):
        counts, _ = np.histogram(true_label_confidence(pred).double().numpy(), bins=edges)
        histogram[name] = [int(c) for c in counts]
    return {
        "confidence_histogram": histogram,
        "mia_roc": {"forget_vs_test": _roc(forget, test), "retain_vs_test": _roc(retain, test)},
    }


@dataclass
class ClassifierEvaluation:
    metrics: dict[str, float]
    evidence: dict[str, Any]


def evaluate_classifier(
    model: nn.Module,
    forget_loader: Iterable[Any],
    retain_loader: Iterable[Any],
    test_loader: Iterable[Any],
    seed: int = 0,
    max_mia_examples: int = 5000,
) -> ClassifierEvaluation:
    """`classification_metrics` and `classification_evidence` from one pass over the three sets."""
    forget = predictions(model, forget_loader)
    retain = predictions(model, retain_loader)
    test = predictions(model, test_loader)
    for pred, name in ((forget, "forget"), (retain, "retain"), (test, "test")):
        _require_examples(pred, name)
    metrics: dict[str, float] = {
        "ua": 1.0 - accuracy(forget),
        "ra": accuracy(retain),
        "ta": accuracy(test),
    }
    metrics.update(mia_efficacy(forget, retain, test, seed=seed, max_examples=max_mia_examples))
    metrics.update(mia_auc(forget, retain, test))
    metrics.update({"n_forget": len(forget), "n_retain": len(retain), "n_test": len(test)})
    return ClassifierEvaluation(metrics, classification_evidence(forget, retain, test))


def classification_metrics(
    model: nn.Module,
    forget_loader: Iterable[Any],
    retain_loader: Iterable[Any],
    test_loader: Iterable[Any],
    seed: int = 0,
    max_mia_examples: int = 5000,
) -> dict[str, float]:
    """UA, RA, TA, both MIAs and the set sizes of `model`, under the record keys of DESIGN.md section 7.

    Keys: ua, ra, ta, mia_efficacy, mia_attack_accuracy, mia_train_size, mia_auc, mia_auc_retain_vs_test
    (fractions in [0, 1], except mia_train_size) and n_forget, n_retain, n_test. Counts are ints.
    """
    return evaluate_classifier(model, forget_loader, retain_loader, test_loader, seed, max_mia_examples).metrics


def mia_is_informative(metrics: Mapping[str, float], margin: float = 0.05) -> bool:
    """Whether the SVC attack separates retain from test at all: ``mia_attack_accuracy`` ≥ 0.5 + margin."""
    if "mia_attack_accuracy" not in metrics:
        raise SafeEditError("metrics have no 'mia_attack_accuracy'")
    return float(metrics["mia_attack_accuracy"]) >= 0.5 + margin


def gap_to_retrain(metrics: Mapping[str, float], retrain: Mapping[str, float], keys: Sequence[str] = GAP_KEYS) -> float:
    """Mean absolute difference to the retrained-from-scratch reference over `keys` (fractions); lower is better."""
    if not keys:
        raise SafeEditError("gap_to_retrain needs at least one metric key")
    missing = [key for key in keys if key not in metrics or key not in retrain]
    if missing:
        raise SafeEditError(f"gap_to_retrain: metric(s) {missing} missing from the run or the retrain reference")
    return float(sum(abs(float(metrics[key]) - float(retrain[key])) for key in keys) / len(keys))
