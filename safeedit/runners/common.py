"""What every runner shares: progress lines and the record fields that do not depend on the kind of job."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import BaseModel

from safeedit.data.forget import ForgetSplit, fingerprint
from safeedit.io import save_safetensors
from safeedit.masks import Mask
from safeedit.record import environment, file_entry


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
