"""What every runner shares: progress lines and the record fields that do not depend on the kind of job."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from safeedit.record import environment


def say(message: str, progress: bool) -> None:
    if progress:
        print(f"[safeedit] {message}", file=sys.stderr, flush=True)


def common_record(scenario: BaseModel, path: Path, out: Path, device: torch.device) -> dict[str, Any]:
    """Request, scenario, reproducing command, working directory, seeds and environment."""
    return {
        "request": scenario.request.model_dump(mode="json"),
        "scenario": scenario.model_dump(mode="json"),
        "command": shlex.join(["safeedit", "run", str(path), "--out", str(out)]),
        "working_directory": str(Path.cwd()),
        "seeds": {"scenario": scenario.seed, "forget_split": scenario.forget.seed},
        "environment": environment(device),
    }
