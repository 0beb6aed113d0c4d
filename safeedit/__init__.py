"""safeedit: remove data, concepts and harmful behaviour from trained networks by editing only the weights
that attribution points at."""

from safeedit.attribution import SCORES, compute_scores, register_score
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.unlearn.masked import masked_training

__version__ = "0.1.0"

__all__ = ["SCORES", "Mask", "SafeEditError", "__version__", "compute_scores", "masked_training", "register_score"]
