"""Scenario runners, one `Job` per kind of scenario; each writes the same kind of record (DESIGN.md sections 6-7).

`run_scenario` is the one entry point: it loads and validates the scenario (`safeedit.scenario`, which imports
no runner), then runs the job of its schema class (`RUNNERS`, the one table of kinds) inside an output
transaction: everything is written into a fresh temporary folder that replaces the output folder at the end.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from safeedit.errors import SafeEditError
from safeedit.io import atomic_dir
from safeedit.runners.classification import ClassificationJob
from safeedit.runners.generation import GenerationJob
from safeedit.runners.job import Job, check_work, run_job
from safeedit.runners.language import LanguageJob
from safeedit.runners.merge_models import ModelMergeJob
from safeedit.runners.merging import MergeJob
from safeedit.runners.safety import SafetyJob
from safeedit.scenario import (
    GenerationScenario,
    LMScenario,
    MergeScenario,
    ModelMergeScenario,
    SafetyScenario,
    Scenario,
    load_scenario,
)
from safeedit.sharding import launched_processes, process_group

RUNNERS: dict[type, type[Job]] = {
    Scenario: ClassificationJob, GenerationScenario: GenerationJob, SafetyScenario: SafetyJob,
    MergeScenario: MergeJob, LMScenario: LanguageJob, ModelMergeScenario: ModelMergeJob,
}


def run_scenario(path: str | Path, out_dir: str | Path | None = None, progress: bool = True,
                 overwrite: bool = False, then: Callable[[Path, Path], object] | None = None,
                 allow_long: bool = False) -> Path:
    """Run the scenario at `path` into `out_dir` (default `runs/<scenario name>`); return the record's final path.

    The outputs are a transaction: a non-empty `out_dir` is refused unless `overwrite` (which replaces it as a
    whole), and nothing appears under `out_dir` until the run, and `then(record_path, out_dir)` (e.g. rendering
    the report next to the record, which is still in the temporary folder), succeeded. Epochs or steps beyond
    `runners.job.WORK_LIMITS` are refused before any work unless `allow_long`.

    Started by `torchrun` / `accelerate launch` (several processes), every process runs the job on the model
    sharded by FSDP2 (the kinds that can: `Job.check_sharded`); the first writes the outputs, the others write
    nothing."""
    path = Path(path)
    scenario = load_scenario(path)
    try:
        check_work(scenario, allow_long)
    except SafeEditError as error:
        raise SafeEditError(f"{path}: {error}") from None
    out = Path(out_dir) if out_dir else Path("runs") / scenario.name
    check_replaceable(out, path, overwrite)
    if scenario.threads:
        torch.set_num_threads(scenario.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    job = RUNNERS[type(scenario)]
    sharded = launched_processes() > 1
    if sharded:
        try:
            job.check_sharded(scenario)
        except SafeEditError as error:
            raise SafeEditError(f"{path}: {error}") from None
    with process_group(device) as first:
        if device.type == "cuda" and sharded:
            device = torch.device("cuda", torch.cuda.current_device())
        if not first:  # the same collectives as the first process; what they would write is dropped
            with tempfile.TemporaryDirectory(prefix="safeedit-rank-") as scratch:
                run_job(job(scenario, path, Path(scratch), device, False, final_out=out, sharded=True))
            return out / "record.json"
        with atomic_dir(out, overwrite=overwrite, progress=progress) as work:
            record = run_job(job(scenario, path, work, device, progress, final_out=out, sharded=sharded))
            if then is not None:
                then(record, out)
    return out / record.name


def check_replaceable(out: Path, scenario_path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder whose replacement would delete what is not an earlier run: the
    working folder (or one above it), a folder holding the scenario file, or (with `overwrite`) files without a
    record. `atomic_dir` refuses any other non-empty folder unless `overwrite`."""
    if not out.is_dir():
        return
    here = out.resolve()
    if Path.cwd().resolve().is_relative_to(here):
        raise SafeEditError(f"--out {out} is the working folder or holds it; name a new folder for the outputs")
    if not overwrite or not any(out.iterdir()):
        return
    if scenario_path.resolve().is_relative_to(here):
        raise SafeEditError(f"--out {out} holds the scenario file {scenario_path}, which --overwrite would delete; "
                            "choose another output folder")
    if not (out / "record.json").is_file():
        raise SafeEditError(f"--out {out} holds files but no earlier run (no record.json); --overwrite replaces "
                            "an earlier run only: choose a new output folder")


__all__ = ["RUNNERS", "check_replaceable", "run_scenario"]
