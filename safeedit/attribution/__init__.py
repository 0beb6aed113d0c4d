"""Gradient-attribution core: stream data through a model and accumulate per-parameter scores."""

from safeedit.attribution import scores as _scores  # noqa: F401  (registers the built-in scores)
from safeedit.attribution.params import select_parameters
from safeedit.attribution.registry import SCORES, ScoreSpec, get_score, register_score
from safeedit.attribution.statistics import GradientSum, InputSquareSum, SquaredGradientSum, Statistic
from safeedit.attribution.stream import compute_scores

__all__ = [
    "SCORES",
    "GradientSum",
    "InputSquareSum",
    "ScoreSpec",
    "SquaredGradientSum",
    "Statistic",
    "compute_scores",
    "get_score",
    "register_score",
    "select_parameters",
]
