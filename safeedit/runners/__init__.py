"""Scenario runners, one per kind of job; each writes the same kind of record (DESIGN.md sections 6-7).

`run_scenario` is the one entry point: it loads and validates the scenario (`safeedit.scenario`, which imports
no runner), then dispatches on its schema class through `RUNNERS`, the one table of kinds and their runners.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from safeedit.runners.classification import run_classification
from safeedit.runners.generation import run_generation
from safeedit.runners.language import run_llm_unlearning
from safeedit.runners.merging import run_merging
from safeedit.runners.safety import run_safety
from safeedit.scenario import (
    GenerationScenario,
    LMScenario,
    MergeScenario,
    SafetyScenario,
    Scenario,
    load_scenario,
)

RUNNERS: dict[type, Callable[..., Path]] = {
    Scenario: run_classification, GenerationScenario: run_generation, SafetyScenario: run_safety,
    MergeScenario: run_merging, LMScenario: run_llm_unlearning,
}


def run_scenario(path: str | Path, out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run the scenario at `path`; return the path of the record it wrote (render it with `safeedit.report`)."""
    path = Path(path)
    scenario = load_scenario(path)
    out = Path(out_dir) if out_dir else Path("runs") / scenario.name
    out.mkdir(parents=True, exist_ok=True)
    if scenario.threads:
        torch.set_num_threads(scenario.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return RUNNERS[type(scenario)](scenario, path, out, device, progress)


__all__ = ["RUNNERS", "run_scenario"]
