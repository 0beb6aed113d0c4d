"""What every runner shares: progress lines and the record fields that do not depend on the kind of job."""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from pydantic import BaseModel
from torch import nn

from safeedit.data.forget import ForgetSplit, fingerprint
from safeedit.data.prompts import ChatExample
from safeedit.io import cache_dir, load_safetensors, save_safetensors, sha256_text
from safeedit.masks import Mask
from safeedit.models.state import load_state_dict_strict
from safeedit.progress import say
from safeedit.record import environment, file_entry

if TYPE_CHECKING:
    from safeedit.models.lm_training import FinetuneOptions


def common_record(scenario: BaseModel, path: Path, out: Path, device: torch.device) -> dict[str, Any]:
    """Request, scenario, reproducing command, working directory, seeds and environment."""
    return {
        "request": scenario.request.model_dump(mode="json"),
        "scenario": scenario.model_dump(mode="json"),
        "command": shlex.join(["safeedit", "run", str(path), "--out", str(out)]),
        "working_directory": str(Path.cwd()),
        "seeds": {"scenario": scenario.seed,
                  **({"forget_split": scenario.forget.seed} if hasattr(scenario, "forget") else {})},
        "environment": environment(device),
    }


def cached_weights(folder: str, label: str, key: Mapping[str, Any], empty: Callable[[], nn.Module],
                   train: Callable[[], nn.Module], metadata: Mapping[str, str], progress: bool
                   ) -> tuple[nn.Module, Path, bool]:
    """A trained model from the cache, or `train()` and cache it: the file is `<cache>/<folder>/<label>-<hash of
    key>.safetensors`, so any change to what the key names retrains and nothing stale is reused. `empty()` builds
    the architecture the cached tensors are loaded into (strictly). Returns the model, its file and whether it
    came from the cache."""
    digest = sha256_text(json.dumps(key, sort_keys=True))[:16]
    path = cache_dir() / folder / f"{label}-{digest}.safetensors"
    if path.exists():
        say(f"{label}: cached ({path})", progress)
        model = empty()
        tensors, _ = load_safetensors(path)
        load_state_dict_strict(model, tensors, str(path))
        return model.eval(), path, True
    model = train()
    save_safetensors(model.state_dict(), path, dict(metadata))
    return model, path, False


def data_fingerprints(split: ForgetSplit, test: Dataset) -> dict[str, dict]:
    """Count and id hash of the forget, retain and test sets."""
    return {**split.fingerprints(), "test": fingerprint(test)}


def input_entries(scenario_path: Path, weights_by_role: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    """Record entries of the scenario file and of weight files (role -> {path: SHA-256 the loader computed})."""
    weights = [file_entry(path, role, sha256=digest)
               for role, files in weights_by_role.items() for path, digest in files.items()]
    return [file_entry(scenario_path, "scenario"), *weights]


class OutputWriter:
    """Writes a run's weights and masks into `out` and keeps their record entries (path, role, SHA-256)."""

    def __init__(self, out: Path, scenario_name: str, source_weights_sha256: str) -> None:
        self.out, self.scenario_name, self.source_sha256 = out, scenario_name, source_weights_sha256
        self.entries: list[dict[str, str]] = []

    def add(self, path: Path, role: str) -> None:
        self.entries.append(file_entry(path, role, self.out))

    def save(self, name: str, state_dict: dict[str, torch.Tensor], mask: Mask | None) -> dict[str, Any] | None:
        """`<name>.safetensors` (and `<name>.mask.safetensors`); returns the mask summary for the record."""
        weights = self.out / f"{name}.safetensors"
        save_safetensors(state_dict, weights, {"method": name, "scenario": self.scenario_name})
        self.add(weights, "edited weights" if name != "retrain" else "reference weights")
        return self.save_mask(name, mask) if mask is not None else None

    def save_mask(self, name: str, mask: Mask) -> dict[str, Any]:
        """`<name>.mask.safetensors` alone (when the edited weights follow from it and a recorded input)."""
        mask_path = self.out / f"{name}.mask.safetensors"
        mask.metadata.update(source_weights_sha256=self.source_sha256, method=name)
        mask.save(mask_path)
        self.add(mask_path, "mask")
        return {"path": mask_path.name, **{k: v for k, v in mask.summary().items() if k != "metadata"}}


def cached_finetune(model: nn.Module, tokenizer: Any, examples: list[ChatExample], options: FinetuneOptions,
                    seed: int, what: str, source_sha256: str, progress: bool) -> tuple[nn.Module, Path]:
    """Fine-tune `model` (or load the cached result of the same fine-tune): keyed by the source weights, the
    examples, the options and the seed."""
    from safeedit.models.lm_training import finetune_chat, with_lora  # peft: only LM runners need it

    key = {"what": what, "source": source_sha256, "options": options.model_dump(), "seed": seed,
           "examples": sha256_text(json.dumps([[e.prompt, e.answer] for e in examples]))}

    def empty() -> nn.Module:
        # An unmerged LoRA fine-tune is stored and reloaded with its adapter (to prune its factors: layers `lora`).
        return with_lora(model, options) if options.lora_rank and not options.merge else copy.deepcopy(model)

    def train() -> nn.Module:
        say(f"{what}: fine-tuning on {len(examples)} examples (cached afterwards)", progress)
        return finetune_chat(model, tokenizer, examples, options, seed, progress, what)

    tuned, path, _ = cached_weights("lm", what, key, empty, train,
                                    {"what": what, "source_weights_sha256": source_sha256}, progress)
    return tuned, path
