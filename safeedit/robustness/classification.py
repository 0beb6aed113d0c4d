"""The classifier's attack surface: the attacker holds a share of the forget images and, as related data that
was never forgotten, as many test images of the forgotten classes (any test images when the request is not a
class); UA is measured on the forget images the attacker does not hold, TA on the test images left."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from datasets import Dataset

from safeedit.batches import default_loss
from safeedit.eval.classification import accuracy, predictions
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
        return {"ua": 1.0 - accuracy(predictions(model, eval_forget)), "ta": accuracy(predictions(model, eval_test))}

    what = "other test images of the forgotten class" if class_request else "test images (same distribution)"
    relearn = {
        "forget": RelearnSet(f"{len(attacker)} of the {len(forget)} forget images ({options.forget_share:.0%})",
                             len(attacker), lambda: iter(loader(attacker, batch, True, seed))),
        "related": RelearnSet(f"{len(related)} {what}, never forgotten", len(related),
                              lambda: iter(loader(related, batch, True, seed + 1))),
    }
    about = (f"UA on the {len(measured_forget)} forget images the attacker does not hold, TA on {len(measured_test)} "
             f"test images; batch {batch}")
    return AttackSurface(measure=measure, primary="ua", forgotten="high", relearn=relearn, loss=default_loss,
                         lr=DEFAULT_LR, about=about)
