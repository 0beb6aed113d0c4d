"""Model loading (local safetensors, transformers Auto classes) and the embedded default architectures."""

from safeedit.models.classifiers import SmallCNN, SmallCNNConfig
from safeedit.models.loading import LoadedModel, load_model
from safeedit.models.zoo import EMBEDDED_MODELS, cache_dir

__all__ = ["EMBEDDED_MODELS", "LoadedModel", "SmallCNN", "SmallCNNConfig", "cache_dir", "load_model"]
