"""The classifier's attack surface: the attacker holds a share of the forget images and, as related data that
was never forgotten, as many test images of the forgotten classes (any test images when the request is not a
class); UA and the log-odds membership AUC are measured on the forget images the attacker does not hold, TA on the
test images left. The curves follow UA for a forgotten class, and the membership AUC for other requests (a random
share of the images: the retrained model misclassifies few of them, so UA barely moves, while membership is what
forgetting them changes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from datasets import Dataset

from safeedit.batches import default_loss
from safeedit.eval.classification import accuracy, forget_vs_test_auc, predictions
from safeedit.robustness.battery import AttackSurface, RobustnessOptions
from safeedit.robustness.relearn import RelearnSet

DEFAULT_LR, DEFAULT_BATCH = 1e-3, 8


def classification_surface(forget: Dataset, test: Dataset, loader: Callable[..., Any], options: RobustnessOptions,
                           seed: int, class_request: bool) -> AttackSurface:
    """`loader(data, batch_size, shuffle, seed)` as the job's; `class_request`: the forget set is whole classes."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(forget))
    held = max(1, round(options.forget_share * len(forget)))
    attacker = forget.select(order[:held])
    measured_forget = forget.select(order[held:]) if held < len(forget) else forget
    forgotten = set(np.asarray(forget["label"]).tolist())
    labels = np.asarray(test["label"])
    candidates = np.flatnonzero(np.isin(labels, list(forgotten))) if class_request else np.arange(len(test))
    related_rows = rng.permutation(candidates)[:held]
    related = test.select(np.sort(related_rows))
    measured_test = test.select(np.setdiff1d(np.arange(len(test)), related_rows))
    batch = options.batch_size or DEFAULT_BATCH
    eval_forget, eval_test = loader(measured_forget, 256, False, seed), loader(measured_test, 256, False, seed)

    def measure(model: Any) -> dict[str, float]:
        forget_predictions, test_predictions = predictions(model, eval_forget), predictions(model, eval_test)
        return {"ua": 1.0 - accuracy(forget_predictions), "ta": accuracy(test_predictions),
                "mia_auc": forget_vs_test_auc(forget_predictions, test_predictions)}

    what = "other test images of the forgotten class" if class_request else "test images (same distribution)"
    relearn = {
        "forget": RelearnSet(f"{len(attacker)} of the {len(forget)} forget images ({options.forget_share:.0%})",
                             len(attacker), lambda: iter(loader(attacker, batch, True, seed))),
        "related": RelearnSet(f"{len(related)} {what}, never forgotten", len(related),
                              lambda: iter(loader(related, batch, True, seed + 1))),
    }
    about = (f"UA and membership AUC on the {len(measured_forget)} forget images the attacker does not hold, TA on "
             f"{len(measured_test)} test images; batch {batch}.")
    primary, forgotten = ("ua", "high") if class_request else ("mia_auc", "low")
    return AttackSurface(measure=measure, primary=primary, forgotten=forgotten, relearn=relearn, loss=default_loss,
                         lr=DEFAULT_LR, about=about)
