"""The plain supervised recipe used to produce the embedded classifiers (and, later, the retrain reference)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from safeedit.batches import default_forward, default_loss, labels_of, logits_of, to_device
from safeedit.progress import bars_off


def train_classifier(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    progress: bool = True,
    description: str = "training",
) -> nn.Module:
    """Adam on the model's own loss for `epochs` passes over `loader`; shuffling is the loader's (seed it)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in tqdm(range(epochs), desc=description, unit="epoch", disable=bars_off(progress), leave=False):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            default_loss(model, to_device(batch, device)).backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Share of examples whose argmax prediction equals the label (model in eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = to_device(batch, device)
        labels = labels_of(batch)
        predictions = logits_of(default_forward(model, batch)).argmax(dim=-1)
        correct += int((predictions == labels).sum())
        total += labels.numel()
    model.train(was_training)
    return correct / max(1, total)
