"""Reference models of a classifier: the architecture checks made from configurations alone (before any weights
load), and the starting point of a reference fine-tuned from the model's base checkpoint.

A reference of another architecture would make every "gap to retrain" meaningless, so it is refused before the
model to unlearn is loaded: a given reference (`reference: {model: PATH}`) must have the model's configuration
class, architecture, labels and parameter names and shapes; a base (`reference: {from: BASE}`) must have the
configuration class of the model and, with the model's labels, build exactly the model's parameters. Shapes come
from instantiating both classes on the meta device (no memory, no weights read).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.models.compare import first_difference, safetensors_shapes
from safeedit.models.loading import check_safetensors
from safeedit.models.zoo import EMBEDDED_MODELS

_LABELS = ("num_labels", "id2label")


def check_reference_architecture(model_spec: str, reference_spec: str, field: str,
                                 trust_remote_code: bool = False) -> None:
    """Refuse a reference (`field` "reference.model") or base ("reference.from") that cannot be the model's, from
    configurations and safetensors headers only; one line naming the difference and the fix."""
    if model_spec in EMBEDDED_MODELS:
        _check_embedded_file(model_spec, reference_spec, field)
        return
    model_config = _config(model_spec, "model.name", trust_remote_code)
    reference_config = _config(reference_spec, field, False)
    fix = ("give the checkpoint the model was fine-tuned from" if field == "reference.from" else
           "give a model of the same architecture and labels, trained without the forget data")
    if type(reference_config) is not type(model_config):
        _mismatch(field, reference_spec, model_spec, f"config class {type(reference_config).__name__} vs "
                  f"{type(model_config).__name__}", fix)
    model_class = _architecture(model_config, model_spec, "model.name")
    if field == "reference.model":
        reference_class = _architecture(reference_config, reference_spec, field)
        if reference_class is not model_class:
            _mismatch(field, reference_spec, model_spec, f"architecture {reference_class.__name__} vs "
                      f"{model_class.__name__}", fix)
        for name in _LABELS:
            ours, theirs = getattr(reference_config, name), getattr(model_config, name)
            if ours != theirs:
                _mismatch(field, reference_spec, model_spec, f"{name} {ours} vs {theirs}", fix)
    else:  # a base takes the model's labels: its head is new
        reference_config = copy.deepcopy(reference_config)
        reference_config.id2label, reference_config.label2id = model_config.id2label, model_config.label2id
    difference = _shape_difference(_meta_shapes(model_class, reference_config), _meta_shapes(model_class, model_config))
    if difference:
        _mismatch(field, reference_spec, model_spec, difference, fix)


def _mismatch(field: str, reference: str, model: str, what: str, fix: str) -> None:
    raise SafeEditError(f"{field}: {reference} does not match the model {model} ({what}); {fix}")


def _config(spec: str, field: str, trust_remote_code: bool) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as error:
        why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        raise SafeEditError(f"{field}: {spec}: no configuration transformers can read ({why}); give a "
                            "save_pretrained folder or a reachable hub id") from None


def _architecture(config: transformers.PretrainedConfig, spec: str, field: str) -> type[nn.Module]:
    name = (config.architectures or [None])[0]
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        raise SafeEditError(f"{field}: {spec}: config.json names no architecture this transformers version knows "
                            f"({name}); save the model with save_pretrained()")
    return model_class


def _meta_shapes(model_class: type[nn.Module], config: transformers.PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer names -> shapes of `model_class(config)`, built on the meta device."""
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _shape_difference(reference: dict[str, tuple[int, ...]], model: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference of two name -> shape maps, in words (None when equal)."""
    difference = first_difference(model, reference)
    if difference is None:
        return None
    name, in_model, in_reference = difference
    if in_reference is None:
        return f"parameter {name!r} only in the model"
    if in_model is None:
        return f"parameter {name!r} not in the model"
    return f"parameter {name!r} is {list(in_reference)}, the model's {list(in_model)}"


def _check_embedded_file(model_name: str, path: str, field: str) -> None:
    """An embedded model's reference is a safetensors file of its architecture (names and shapes from the header)."""
    check_safetensors(Path(path))
    given = safetensors_shapes(path)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in EMBEDDED_MODELS[model_name].build().state_dict().items()}
    difference = _shape_difference(given, expected)
    if difference:
        _mismatch(field, path, model_name, difference, f"give weights of {model_name}'s architecture, trained "
                  "without the forget data")


@dataclass
class BaseStart:
    """Where a reference fine-tuned from a base checkpoint starts: the model's class and configuration, the body's
    weights from the base, and the rest (the head, and a pooler the base lacks) initialised by the class from the
    torch seed in effect, as any fine-tune from a base starts."""

    body: dict[str, torch.Tensor]  # the base's weights, named as in the model
    initialised: list[str]  # the model's tensors the base does not give

    @classmethod
    def of(cls, base: nn.Module, like: nn.Module, source: str) -> BaseStart:
        """The start for models like `like` from the loaded `base` (refused if it lacks part of `like`'s body)."""
        prefix = getattr(like, "base_model_prefix", "")
        if not prefix or getattr(like, prefix, None) is None:
            raise SafeEditError(f"reference.from: {type(like).__name__} has no separate body to take from a base; "
                                "use reference: {model: PATH} or {from: scratch}")
        names = like.state_dict()
        body = {f"{prefix}.{name}": tensor for name, tensor in getattr(base, "base_model", base).state_dict().items()
                if f"{prefix}.{name}" in names}
        lacking = [name for name in names if name.startswith(f"{prefix}.") and name not in body
                   and not name.startswith(f"{prefix}.pooler.")]
        if lacking:
            raise SafeEditError(f"reference.from: {source} lacks weights of the model's body (first {lacking[0]!r}); "
                                "give the checkpoint the model was fine-tuned from")
        return cls(body, [name for name in names if name not in body])

    def build(self, like: nn.Module) -> nn.Module:
        """A new model of `like`'s class and configuration holding the base's body weights."""
        model = type(like)(copy.deepcopy(like.config))
        model.load_state_dict(self.body, strict=False)
        return model
