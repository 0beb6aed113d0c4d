"""peft adapter folders as models: the base that `adapter_config.json` names, with the adapter attached.

A folder written by `PeftModel.save_pretrained` (`adapter_config.json` + `adapter_model.safetensors`) loads as a
`PeftModel` over its base (`base_model_name_or_path`: a folder, a hub id or an embedded name, loaded by
the caller's `load_model`, with its `trust_remote_code`, off by default). The adapter is attached as trainable (peft's
`is_trainable=True`: the adapter's weights require gradients, the base's do not) and strictly: every adapter
tensor of the file must land in the model and the model must expect no other, since peft itself only warns when
an adapter meant for another base leaves weights at their fresh values.

When a run saves an edit of such a model (`safeedit.models.export`), an edit that left the base's weights as they
were loaded is written as an adapter folder; one that changed them, as the merged full model. `base_weights_sha256`
tells the two apart against `AdapterSource.base_sha256`, hashed here at load time.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.io import sha256_file, tensors_sha256
from safeedit.models.loaded import AdapterSource, LoadedModel, check_safetensors
from safeedit.models.state import check_finite

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What peft raises when an adapter does not fit a model: modules not found, shapes that differ, bad configs.
PEFT_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, AttributeError)


def load_adapter(path: Path, load_base: Callable[[str], LoadedModel]) -> LoadedModel:
    """The base model named in `path`'s adapter_config.json, loaded by `load_base` (the caller's `load_model`, with
    its dtype and trust_remote_code), with the adapter attached (see the module's text)."""
    base_spec = adapter_base(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in path.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth"))
        raise SafeEditError(
            f"{path}: no {ADAPTER_WEIGHTS}{' (only pickled ' + ', '.join(pickles) + ')' if pickles else ''}; "
            "re-save the adapter with model.save_pretrained(..., safe_serialization=True) where you trust the files")
    check_safetensors(weights)
    try:
        base = load_base(base_spec)
    except SafeEditError as error:
        raise SafeEditError(
            f"{path}: its base model {base_spec!r} (base_model_name_or_path in {ADAPTER_CONFIG}) does not load: "
            f"{error}. Put the base model there, or set base_model_name_or_path to its folder or hub id") from None
    if base.adapter is not None:
        raise SafeEditError(f"{path}: its base {base_spec!r} is itself an adapter; merge that one into its base "
                            "(merge_and_unload) and save it with save_pretrained first")
    model = attach(base.model, path, base_spec)
    tokenizer = base.tokenizer
    if (path / "tokenizer_config.json").is_file():  # a tokenizer saved with the adapter is the one it was tuned with
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    files = {str(p): sha256_file(p) for p in (path / ADAPTER_CONFIG, weights)} | base.files
    source = AdapterSource(folder=str(path), base=base_spec, base_sha256=base_weights_sha256(model))
    return LoadedModel(model.eval(), str(path), tokenizer, base.image_processor, files, origin="adapter",
                       adapter=source)


def adapter_base(path: Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`), or the one-line fix."""
    config_path = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise SafeEditError(f"{config_path}: not valid JSON ({error}); save the adapter with save_pretrained() "
                            "again") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise SafeEditError(f"{config_path}: names no base model; set base_model_name_or_path to the folder or hub "
                            "id of the model the adapter was trained on")
    return base


def attach(base: nn.Module, path: Path, base_spec: str) -> nn.Module:
    """`PeftModel.from_pretrained(base, path, is_trainable=True)`, refusing an adapter that does not fit `base`."""
    from peft import PeftModel, get_peft_model_state_dict

    def misfit(why: str) -> SafeEditError:
        return SafeEditError(f"{path}: the adapter does not fit its base {base_spec!r} ({why}); it was trained on "
                             f"another model: set base_model_name_or_path in {ADAPTER_CONFIG} to that model")

    try:
        with warnings.catch_warnings():  # peft calls transformers APIs that warn of their own deprecation
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
    except PEFT_ERRORS as error:
        raise misfit(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}") from None
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as handle:
        stored = set(handle.keys())
    expected = set(get_peft_model_state_dict(model))
    if stored != expected:
        name = sorted(stored - expected or expected - stored)[0]
        side = "in the file, not in the model" if name in stored else "expected by the model, not in the file"
        raise misfit(f"adapter tensor {name!r} {side}")
    check_finite(model, str(path))
    return model


def untrained_like(model: nn.Module) -> nn.Module:
    """A newly initialised model of `model`'s architecture, where a reference is retrained from scratch: for a
    transformers model, its class from its config; for a peft model, its base (pretrained, unchanged) with a new
    adapter of the same configuration, so that the reference is the adapter trained without the forget data."""
    if not is_adapter_model(model):
        return type(model)(model.config)
    from peft import get_peft_model

    config = copy.deepcopy(model.peft_config[model.active_adapter])
    config.inference_mode = False
    return get_peft_model(copy.deepcopy(model).unload(), config)


def is_adapter_model(model: Any) -> bool:
    """Whether `model` is a peft model (without importing peft when it was never imported)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def adapter_key(name: str, model: nn.Module) -> bool:
    """Whether state-dict entry `name` of peft model `model` belongs to an adapter (LoRA factors, the adapter's
    copies of `modules_to_save`), not to the base: one of its dotted parts is an adapter's name."""
    return any(part in model.peft_config for part in name.split("."))


def base_weights_sha256(model: nn.Module) -> str:
    """Content hash of a peft model's base weights (every state-dict entry that is not an adapter's)."""
    return tensors_sha256({name: tensor for name, tensor in model.state_dict().items()
                           if not adapter_key(name, model)})
