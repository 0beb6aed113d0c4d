"""Merging models a user already fine-tuned (`kind: merge`, `safeedit merge`): a base model and task models named
by folder or hub id, checked to be fine-tunes of that base, and split into what is merged and what is kept.

Merged: every floating-point parameter of the body (`model.base_model` of a transformers model, e.g. `bert.*` of
a BertForSequenceClassification), matched by its name inside the body, so a base saved as BertModel merges task
models saved as BertForSequenceClassification; and parameters outside the body that the base has with the same
shape and that are no classifier's task head (a causal LM's `lm_head`, which mergekit merges too).

Not merged, each with its reason in `OwnModels.excluded` (the record lists them): classifier heads, the modules
outside the body of a *ForSequenceClassification, *ForTokenClassification, ... model (each task's labels are its
own; `merge_heads` merges them when every model was fine-tuned for the same labels); parameters the base lacks or
whose shape differs from the base's (mergekit skips those too); names matching `exclude`; parameters of the base
no task model has. The merged model keeps the base's values there, and each task model its own.

A body that differs from the base's in a name or shape is another base: refused, naming the first tensor that
differs, before anything is merged. Every model is loaded as float32, so the arithmetic is float32 whatever the
storage dtype; `storage_dtype` is what the base was saved as (the default dtype of the written merge).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from safeedit.data.sources import FILE_BUILDERS, DataSpec
from safeedit.errors import SafeEditError
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import check_same_architecture, with_parameters
from safeedit.models.encoders import with_soft_token
from safeedit.models.loading import LoadedModel, load_model

# Model classes whose modules outside the body are a task's own head (its labels), never shared by other tasks.
CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification",
                    "ForAudioClassification", "ForQuestionAnswering", "ForMultipleChoice")
HUB_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")  # org/name, or a legacy name without an org


def _is_local(spec: str) -> bool:
    """A spec that can only be a path (hub ids are `name` or `org/name`)."""
    return Path(spec).exists() or spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec)


def check_model_spec(spec: str, where: str) -> None:
    """Refuse a model path that names no folder (before anything loads); hub ids are left to the loader."""
    if _is_local(spec) and not Path(spec).expanduser().is_dir():
        raise SafeEditError(f"{where}: {spec}: no such model folder; give a save_pretrained folder or a hub id "
                            "(org/name)")


def check_data_spec(spec: str, where: str) -> None:
    """Refuse a data spec that does not parse or names a local file that is not there."""
    try:
        source = DataSpec.parse(spec).source
    except SafeEditError as error:
        raise SafeEditError(f"{where}: {error}") from None
    if (Path(source).suffix.lower() in FILE_BUILDERS or _is_local(source)) and not Path(source).exists():
        raise SafeEditError(f"{where}: {source}: no such data file or folder; give a .jsonl, .csv, .json or "
                            ".parquet file (or a folder or hub data set)")


def _config(spec: str) -> dict[str, Any] | None:
    """A local model folder's config.json, if it reads (the loader names any problem with it)."""
    path = Path(spec) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_same_base(base: str, tasks: Mapping[str, str]) -> None:
    """Refuse, from config.json alone (no weights read), a task model of another model type than the base."""
    base_config = _config(base)
    if base_config is None or "model_type" not in base_config:
        return
    for spec in tasks.values():
        config = _config(spec)
        if config is not None and config.get("model_type", base_config["model_type"]) != base_config["model_type"]:
            raise SafeEditError(f"task model {spec} is a {config['model_type']} model, the base model {base} a "
                                f"{base_config['model_type']}; task models must be fine-tunes that share the base "
                                "model's architecture")


def storage_dtype(spec: str) -> str:
    """The dtype a local model folder was saved as (config.json `dtype`, or `torch_dtype`), float32 if unsaid."""
    config = _config(spec) or {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def body_prefix(model: nn.Module) -> str:
    """The name prefix of a transformers model's body (`bert.`), or '' when the model is its own body."""
    body = getattr(model, "base_model", model)
    if body is model or not isinstance(body, nn.Module):
        return ""
    return next((f"{path}." for path, module in model.named_modules() if module is body), "")


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith(CLASSIFIER_HEADS)


def _floating(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if torch.is_floating_point(p)}


@dataclass
class OwnModels:
    """A loaded base model and task models, and which parameters are merged (`names`) and which not (`excluded`)."""

    base: LoadedModel
    tasks: dict[str, LoadedModel]
    names: dict[str, dict[str, str]]  # task -> {merged parameter's name in the base: its name in the task model}
    excluded: dict[str, str] = field(default_factory=dict)  # parameter name -> why it is not merged

    @property
    def merged(self) -> list[str]:
        return list(next(iter(self.names.values())))

    def base_part(self) -> dict[str, torch.Tensor]:
        """θ₀ of the merged parameters, by their names in the base."""
        params = _floating(self.base.model)
        return {name: params[name] for name in self.merged}

    def task_part(self, task: str) -> dict[str, torch.Tensor]:
        """θᵢ of the merged parameters, by their names in the base."""
        params = _floating(self.tasks[task].model)
        return {name: params[own] for name, own in self.names[task].items()}

    def merged_model(self, parameters: Mapping[str, torch.Tensor]) -> nn.Module:
        """A copy of the base model carrying the merged parameters (the rest as the base has them)."""
        return with_parameters(self.base.model, parameters)

    def task_model(self, task: str, parameters: Mapping[str, torch.Tensor]) -> nn.Module:
        """A copy of task model `task` carrying the merged parameters, its own head and excluded parameters kept."""
        return with_parameters(self.tasks[task].model, {self.names[task][n]: t for n, t in parameters.items()})


def load_own_models(base: str, tasks: Mapping[str, str], exclude: str | None = None, merge_heads: bool = False,
                    trust_remote_code: bool = False, progress: bool = True) -> OwnModels:
    """Load the base and the task models (float32) and decide what is merged (module docstring)."""
    check_same_base(base, tasks)
    loaded_base = load_model(base, dtype=torch.float32, trust_remote_code=trust_remote_code, progress=progress)
    loaded = {task: load_model(spec, dtype=torch.float32, trust_remote_code=trust_remote_code, progress=progress)
              for task, spec in tasks.items()}
    base_params = _floating(loaded_base.model)
    prefix = body_prefix(loaded_base.model)
    body = {name: tensor for name, tensor in base_params.items() if name.startswith(prefix)}
    excluded: dict[str, str] = {}
    names: dict[str, dict[str, str]] = {}
    for task, model in loaded.items():
        params, own_prefix = _floating(model.model), body_prefix(model.model)
        inside = {prefix + name[len(own_prefix):]: name for name in params if name.startswith(own_prefix)}
        missing = [name for name in body if name not in inside]
        if len(missing) > len(body) / 2:
            raise SafeEditError(f"task model {tasks[task]}: {len(missing)} of the {len(body)} tensors of the base "
                                f"model's body are missing (first {missing[0]!r}); task models must be fine-tunes "
                                "that share the base model's architecture")
        check_same_architecture({name: t for name, t in body.items() if name in inside},
                                {name: params[own] for name, own in inside.items()}, f"task model {tasks[task]}")
        for name in missing:  # e.g. a pooler the task's class does not build: kept as the base has it
            excluded.setdefault(name, f"not in task model {task}")
        names[task] = dict(inside)
        for name in params:
            if name.startswith(own_prefix):
                continue
            why = _head_problem(model.model, name, params[name], base_params, merge_heads)
            if why:
                excluded.setdefault(name, why)
            else:
                names[task][name] = name
    shared = set.intersection(*(set(mapping) for mapping in names.values()))
    for name in sorted({n for mapping in names.values() for n in mapping} - shared):
        excluded.setdefault(name, "not mergeable in every task model")
    if exclude:
        for name in sorted(shared):
            if re.search(exclude, name):
                excluded[name] = f"matches exclude {exclude!r}"
    for name in base_params:
        if name not in shared:
            excluded.setdefault(name, "in the base model only; kept as the base has it")
    names = {task: {n: own for n, own in mapping.items() if n in shared and n not in excluded}
             for task, mapping in names.items()}
    if not next(iter(names.values())):
        raise SafeEditError(f"no parameter of {base} is left to merge (exclude {exclude!r}); exclude less")
    return OwnModels(loaded_base, loaded, names, excluded)


def _head_problem(model: nn.Module, name: str, tensor: torch.Tensor, base: Mapping[str, torch.Tensor],
                  merge_heads: bool) -> str | None:
    """Why a task model's parameter outside its body is not merged, or None if it is."""
    if is_classifier(model) and not merge_heads:
        return (f"classifier head of a {type(model).__name__}: each task model keeps its own (merge_heads: true "
                "merges heads fine-tuned for the same labels)")
    if name not in base:
        return "not in the base model"
    if tuple(base[name].shape) != tuple(tensor.shape):
        return f"shape {tuple(tensor.shape)} differs from the base's {tuple(base[name].shape)}"
    return None


class SequenceClassifier(nn.Module):
    """A transformers sequence classifier called as the merge bodies are: `forward(batch, delta)` gives logits,
    `delta` being a soft token inserted after the first token (DAM's inverted trigger, as `TextEncoder` has it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        if delta is None:
            return self.model(input_ids=ids, attention_mask=attention).logits
        embedded, attention = with_soft_token(self.model, ids, attention, delta)
        return self.model(inputs_embeds=embedded, attention_mask=attention).logits


@dataclass
class ClassifierSetting(MergeSetting):
    """The learned merges on a user's own classifiers: `heads[task]` is the whole task classifier, whose merged
    parameters (`renames[task]`: merged name -> its name there) are replaced by the merge through `functional_call`,
    so each task keeps its own head; `space` is where DAM's triggers live (a `TextEncoder` of the base)."""

    renames: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    space: Any = None

    @property
    def trigger_space(self) -> Any:
        return self.space

    def logits(self, parameters: Mapping[str, torch.Tensor], task: str, batch: Mapping,
               delta: torch.Tensor | None = None) -> torch.Tensor:
        renamed = {self.renames[task][name]: tensor for name, tensor in parameters.items()}
        return functional_call(self.heads[task], renamed, (batch,), {"delta": delta}, strict=False)
