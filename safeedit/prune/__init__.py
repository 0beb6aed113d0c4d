"""One-shot pruning: zero the weights a score localizes (Antidote and its baselines)."""

from safeedit.prune.antidote import (
    LAYER_SETS,
    PRUNE_SCORES,
    PruneSetting,
    PruningOptions,
    layer_patterns,
    prune,
    pruning_mask,
)

__all__ = ["LAYER_SETS", "PRUNE_SCORES", "PruneSetting", "PruningOptions", "layer_patterns", "prune", "pruning_mask"]
