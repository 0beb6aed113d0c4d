"""What every runner shares: progress lines and the record fields that do not depend on the kind of job."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import BaseModel
from torch import nn

from safeedit.data.forget import ForgetSplit, fingerprint
from safeedit.io import save_safetensors, write_text_atomic
from safeedit.masks import Mask
from safeedit.models.export import library_of, write_model_folder
from safeedit.models.loaded import AdapterSource
from safeedit.record import environment, file_entry, folder_entry
from safeedit.report.model_card import RunFacts, render_model_card


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


def data_fingerprints(split: ForgetSplit, test: Dataset) -> dict[str, dict]:
    """Count and id hash of the forget, retain and test sets."""
    return {**split.fingerprints(), "test": fingerprint(test)}


def input_entries(scenario_path: Path, weights_by_role: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    """Record entries of the scenario file and of weight files (role -> {path: SHA-256 the loader computed})."""
    weights = [file_entry(path, role, sha256=digest)
               for role, files in weights_by_role.items() for path, digest in files.items()]
    return [file_entry(scenario_path, "scenario"), *weights]


class OutputWriter:
    """Writes a run's models, weights and masks into `out` and keeps their record entries (path, role, SHA-256).

    A Hugging Face model is written as a `save_pretrained` folder `<name>/` with a model card (`save_model`,
    `safeedit.models.export`); `run` holds what the card says of the run, `processors` what is saved beside the
    weights (tokenizer, image processor, scheduler), `adapter` the loaded adapter's source (an edit of the adapter
    alone is written as an adapter), `final_out` where the folder ends up (the record's loading line names it).
    Masks stay `<name>.mask.safetensors` next to the folder; any other model, `<name>.safetensors`.
    """

    def __init__(self, out: Path, scenario_name: str, source_weights_sha256: str, run: RunFacts | None = None,
                 processors: Sequence[Any] = (), adapter: AdapterSource | None = None,
                 final_out: Path | None = None) -> None:
        self.out, self.scenario_name, self.source_sha256 = out, scenario_name, source_weights_sha256
        self.run = run or RunFacts(scenario=scenario_name, kind="", request={}, source="",
                                   source_sha256=source_weights_sha256)
        self.processors = [p for p in processors if p is not None]
        self.adapter, self.final_out = adapter, final_out or out
        self.entries: list[dict[str, Any]] = []

    def add(self, path: Path, role: str) -> None:
        self.entries.append(file_entry(path, role, self.out))

    def save_model(self, name: str, model: nn.Module, mask: Mask | None, processors: Sequence[Any] | None = None,
                   role: str | None = None) -> dict[str, Any] | None:
        """`<name>/` (`save_pretrained` folder with its model card) for a Hugging Face model, else
        `<name>.safetensors`; then `<name>.mask.safetensors`. Returns the mask summary for the record."""
        if library_of(model) is None:
            return self.save(name, model.state_dict(), mask)
        folder = self.out / name
        written = write_model_folder(folder, model, self.processors if processors is None else processors,
                                     self.adapter.base_sha256 if self.adapter else None)
        write_text_atomic(folder / "README.md", render_model_card(self.run, name, written))
        role = role or ("reference model folder" if name == "retrain" else "edited model folder")
        role += FORM_ROLES[written.form]
        self.entries.append(folder_entry(folder, role, written.load_line(self.final_out / name), self.out))
        return self.save_mask(name, mask) if mask is not None else None

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


# What a model folder holds (`write_model_folder`'s form) -> the words its record role ends with.
FORM_ROLES = {"full model": "", "LoRA adapter": " (LoRA adapter; the base model unchanged)",
              "merged LoRA": " (LoRA adapter merged into its base)"}
