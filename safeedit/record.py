"""The run record: what was asked, which files went in and came out (with SHA-256), the environment, and every
result. Reports are rendered from the record alone (DESIGN.md sections 6-7 name the keys)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from safeedit.io import sha256_file, write_text_atomic

SCHEMA = "safeedit.record/1"


def file_entry(path: str | os.PathLike, role: str, relative_to: Path | None = None) -> dict[str, str]:
    path = Path(path)
    shown = path.relative_to(relative_to) if relative_to and path.is_relative_to(relative_to) else path
    return {"path": str(shown), "role": role, "sha256": sha256_file(path)}


def environment(device: torch.device) -> dict[str, Any]:
    import datasets
    import transformers

    import safeedit

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "safeedit": safeedit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def write_record(record: dict[str, Any], path: str | os.PathLike) -> None:
    record = {"schema": SCHEMA, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record}
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
