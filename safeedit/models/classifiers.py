"""The embedded image classifier: a small CNN that speaks the Hugging Face calling convention.

`forward(pixel_values, labels=None)` returns an `ImageClassifierOutput` with `loss` when labels are given, so
the embedded model and any `transformers` image classifier go through exactly the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


@dataclass(frozen=True)
class SmallCNNConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    downsample: str = "pool"  # "pool": full-resolution convs then max-pool; "stride": the first two convs stride 2

    def to_dict(self) -> dict:
        return asdict(self)


class SmallCNN(nn.Module):
    """conv-bn-relu ×2, max-pool, conv-bn-relu, global average pool, linear head (~60k parameters at width 32)."""

    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        stride = 2 if config.downsample == "stride" else 1  # stride: ~20× cheaper on 28×28 inputs
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, stride=stride, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=stride, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2) if stride == 1 else nn.Identity(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * w, config.num_classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.classifier(self.features(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
