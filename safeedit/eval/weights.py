"""What an edit changed in the weights: how many parameters differ from the original, in total and per tensor,
and (for masked edits) how many changed outside the mask, which must be zero."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.sharding import count_nonzero


@torch.no_grad()
def weight_changes(original: nn.Module, edited: nn.Module, mask: Mask | None = None) -> dict[str, Any]:
    """Count parameters whose value differs (bitwise, `!=`) between `original` and `edited`.

    Sharded models (FSDP2, every process calls this) are counted over all shards. Returns ``changed``, ``total``,
    ``share`` (= changed / total), ``changed_outside_mask`` (None without a mask)
    and ``layers``: one entry per parameter tensor with its name, changed count and size. Buffers (e.g. batch-norm
    running statistics) are not parameters and are not counted.
    """
    before = dict(original.named_parameters())
    layers: list[dict[str, Any]] = []
    outside = 0
    for name, after in edited.named_parameters():
        if name not in before or before[name].shape != after.shape:
            raise SafeEditError(f"parameter {name!r} differs in name or shape between the original and the edit")
        differs = before[name].detach().to(after.device) != after.detach()
        changed = count_nonzero(differs)  # (FSDP2 shards: over every process)
        layers.append({"name": name, "changed": changed, "total": after.numel()})
        if mask is not None:
            selected = mask.tensors.get(name)
            outside += changed if selected is None else count_nonzero(differs & ~selected.to(differs.device))
    changed = sum(layer["changed"] for layer in layers)
    total = sum(layer["total"] for layer in layers)
    return {
        "changed": changed,
        "total": total,
        "share": changed / max(1, total),
        "changed_outside_mask": outside if mask is not None else None,
        "layers": layers,
    }
