"""How a batch meets a model: device moves, and the default loss for Hugging Face and plain PyTorch models.

Two batch shapes are understood everywhere in safeedit:
- a dict of tensors, as `datasets` and Hugging Face collators make them (``labels`` or ``label`` included);
  keys the model's forward does not accept (``id``, raw text) are dropped, as the HF Trainer does;
- an ``(inputs, targets)`` pair for plain classifiers, scored with cross-entropy.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safeedit.errors import SafeEditError


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def _accepted_keys(forward) -> frozenset[str] | None:
    """Keyword names `forward` takes (None: it takes **kwargs). Cached per class function, never per bound method:
    a cache keyed on `model.forward` holds the model, and kept every edited copy alive (~1 GB per LLM run)."""
    function = getattr(forward, "__func__", None)
    return _signature_keys(function) if function is not None else _signature_keys.__wrapped__(forward)


@lru_cache(maxsize=256)
def _signature_keys(function) -> frozenset[str] | None:
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `model.forward` found in `batch` (``label`` renamed ``labels``)."""
    inputs = dict(batch)
    if "label" in inputs and "labels" not in inputs:
        inputs["labels"] = inputs.pop("label")
    accepted = _accepted_keys(model.forward)
    if accepted is not None:
        inputs = {key: value for key, value in inputs.items() if key in accepted}
    return inputs


INPUT_KINDS = {"input_ids": "text", "pixel_values": "images"}  # the input a model reads -> what the data must hold


def model_name(model: nn.Module) -> str:
    """How messages name a model: the folder or hub id it was loaded from, else its class."""
    return getattr(model, "name_or_path", "") or type(model).__name__


def model_reads(model: nn.Module) -> tuple[str, ...]:
    """The inputs of INPUT_KINDS that `model.forward` names (empty: it names none, e.g. it takes ``**kwargs``)."""
    function = getattr(model.forward, "__func__", model.forward)
    return tuple(key for key in INPUT_KINDS if key in _parameter_names(function))


@lru_cache(maxsize=256)
def _parameter_names(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def check_inputs(model: nn.Module, provided: Mapping[str, str], data: str) -> None:
    """Refuse, before any forward pass, data whose input the model does not read: images for a text model, text
    for an image model. `provided` maps the model inputs the batches will hold to the data column behind each."""
    reads = model_reads(model)
    if reads and not set(reads) & set(provided):
        needs = " or ".join(INPUT_KINDS[key] for key in reads)
        has = " and ".join(f"{INPUT_KINDS[key]} (column {column!r})" for key, column in provided.items())
        raise SafeEditError(
            f"model {model_name(model)} reads {needs}; {data} has {has}; give data with {needs}, or a model that "
            f"reads {' and '.join(INPUT_KINDS[key] for key in provided)}"
        )


def labels_of(batch: Any) -> torch.Tensor:
    """The labels of a dict batch ('labels' or 'label') or of an (inputs, targets) pair."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label"):
            if key in batch:
                return batch[key]
        raise SafeEditError(f"the batch has no 'label' or 'labels' (keys: {sorted(batch)}); this needs labels")
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[1]
    raise SafeEditError("a batch must be a dict of tensors with 'label'/'labels' or an (inputs, targets) pair")


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        inputs = model_inputs(model, batch)
        inputs.pop("labels", None)
        return model(**inputs)
    inputs, _targets = batch
    return model(inputs)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean loss of a batch: the model's own loss for dict batches, cross-entropy for (inputs, targets) pairs."""
    if isinstance(batch, Mapping):
        output = model(**model_inputs(model, batch))
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None:
            raise SafeEditError(
                f"{type(model).__name__} returned no loss for a batch with keys {sorted(batch)}; "
                "include 'labels' in the data or pass a loss_fn"
            )
        return loss
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise SafeEditError("a batch must be a dict of tensors or an (inputs, targets) pair; pass a loss_fn otherwise")
    inputs, targets = batch
    return F.cross_entropy(logits_of(model(inputs)), targets)
