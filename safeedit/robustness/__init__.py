"""Does the forgetting hold? The robustness battery (relearning, quantization, each kind's own attacks) that every
scenario can run on every result; see `safeedit.robustness.battery`."""

from safeedit.robustness.battery import (
    AttackSurface,
    RobustnessOptions,
    attack,
    relearn_metric,
    robustness_metric_names,
)
from safeedit.robustness.quantize import Scheme, quantize_model, revival
from safeedit.robustness.relearn import RelearnSet, relearn_curve

__all__ = ["AttackSurface", "RelearnSet", "RobustnessOptions", "Scheme", "attack", "quantize_model",
           "relearn_curve", "relearn_metric", "revival", "robustness_metric_names"]
