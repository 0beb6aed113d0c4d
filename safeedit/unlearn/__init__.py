"""Unlearning: objectives and the one masked training loop they share."""

from safeedit.unlearn.masked import MaskedTraining, masked_training

__all__ = ["MaskedTraining", "masked_training"]
