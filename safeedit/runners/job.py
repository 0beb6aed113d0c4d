"""The one job loop: every kind of scenario runs its methods the same way, and supplies only what differs.

    run_job(job):  prepare (load, split, references)  ->  for each method: time, run, evaluate, save, entry
                   ->  the record (common fields, the kind's fields, outputs, results, verdict)

A `Job` subclass per kind says what its methods get (`setting`), how a result is measured (`evaluate`), what is
written for it (`save`), and what its record adds (`record_fields`); references (the original, a retrained model,
the undefended fine-tune, the frozen encoder) are result entries it adds in `prepare`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from safeedit.criteria import verdict
from safeedit.errors import SafeEditError
from safeedit.methods import EditResult, MethodSpec
from safeedit.progress import say
from safeedit.record import write_record
from safeedit.report.model_card import MethodFacts, RunFacts
from safeedit.robustness import AttackSurface, attack
from safeedit.runners.common import OutputWriter, common_record
from safeedit.runners.references import REFERENCES
from safeedit.sharding import rank_and_world


class Job:
    """What a kind of scenario supplies to `run_job`; the base class holds what every kind shares."""

    kind: str  # the record's `kind`, e.g. "classification-unlearning"

    def __init__(self, scenario: Any, path: Path, out: Path, device: torch.device, progress: bool,
                 final_out: Path | None = None, sharded: bool = False) -> None:
        """`out` is the folder written into; `final_out`, where it ends up (the record's command names it);
        `sharded`: every process started by `torchrun` / `accelerate launch` runs this job on the model sharded by
        FSDP2 (kinds that can: `check_sharded`)."""
        self.scenario, self.path, self.out, self.device, self.progress = scenario, path, out, device, progress
        self.final_out, self.sharded = final_out or out, sharded
        self.results: dict[str, dict[str, Any]] = {}
        self.references = REFERENCES[scenario.method_kind]  # the `about` of the kind's reference rows
        self.evaluation_s = self.robustness_s = 0.0
        self.writer: OutputWriter  # set by `prepare`, once the source weights' SHA-256 is known

    # --- what each kind supplies -------------------------------------------------------------------------------
    @classmethod
    def check_sharded(cls, scenario: Any) -> None:
        """Raise unless this kind can run `scenario` with its model sharded over several processes."""
        raise SafeEditError(f"{cls.kind} scenarios run in one process; start `safeedit run` without torchrun or "
                            "accelerate launch (llm-unlearning scenarios can run sharded)")

    def prepare(self) -> None:
        """Load the model and data, build the setting, add the reference entries to `results`, set `writer`."""
        raise NotImplementedError

    @property
    def setting(self) -> Any:
        """What every method of this kind is handed (see `setting_for`)."""
        raise NotImplementedError

    def setting_for(self, name: str) -> Any:
        """What method `name` is handed (default `setting`; LLM names carry their mask score: `npo+wagle`)."""
        return self.setting

    def describe(self, name: str, spec: MethodSpec, options: BaseModel) -> str:
        """The progress line's words for a method (default: its summary)."""
        return spec.summary

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        """The measured part of a method's result entry (metrics, weight changes; any key of `run_methods`'
        defaults it sets wins); time the measuring with `timed_evaluation`. Writes nothing."""
        raise NotImplementedError

    def save(self, name: str, result: EditResult) -> dict[str, Any]:
        """Write the method's outputs; return the entry fields that describe them (default: its model, a
        `save_pretrained` folder or weights file, and its mask, `{"mask": summary}`)."""
        return {"mask": self.writer.save_model(name, result.model, result.mask)}

    def about(self, name: str, spec: MethodSpec) -> dict[str, str]:
        return spec.about

    def attack_surface(self) -> AttackSurface | None:
        """What the robustness battery attacks and measures (`safeedit.robustness`); None: this kind has none."""
        return None

    def reference_models(self) -> dict[str, Any]:
        """The reference results' models (e.g. original, retrain), attacked like the methods' edits."""
        return {}

    def attacked_model(self, name: str, result: EditResult) -> Any:
        """The model of method `name` the battery attacks (default: the result's model)."""
        return result.model

    @property
    def unedited(self) -> Any:
        """The model the edits started from (weights compared by the quantization diagnostic), if any."""
        return getattr(self, "original", None)

    def after_methods(self) -> None:
        """Outputs that need every method's result (e.g. a grid of samples); runs before the record is written."""

    def record_fields(self, started: float) -> dict[str, Any]:
        """The kind's own record fields: kind, inputs, data, model, timings, notes and any extras."""
        raise NotImplementedError

    # --- shared helpers ----------------------------------------------------------------------------------------
    def output_writer(self, source_sha256: str, processors: Sequence[Any] | None = None) -> OutputWriter:
        """The run's writer (`prepare` sets `writer` to it): model folders get the run's facts for their model card,
        `processors` beside their weights (default: the loaded model's tokenizer and image processor), and the
        loaded adapter's base hash (an edit of the adapter alone is written as an adapter)."""
        scenario, loaded = self.scenario, getattr(self, "loaded", None)
        if processors is None:
            processors = [getattr(loaded, "tokenizer", None), getattr(loaded, "image_processor", None)]
        return OutputWriter(self.out, scenario.name, source_sha256, self.run_facts(source_sha256), processors,
                            getattr(loaded, "adapter", None), self.final_out)

    def run_facts(self, source_sha256: str) -> RunFacts:
        """What model cards say of this run: scenario, request, source model, and each method's (or reference's)
        summary, limitations and options."""
        scenario = self.scenario
        methods = {}
        for name, options in scenario.method_options().items():
            about = self.about(name, scenario.method_spec(name))
            methods[name] = MethodFacts(about["summary"], about["limitations"], options.model_dump(mode="json"))
        for name, about in self.references.items():
            options = getattr(scenario, name, None)
            methods[name] = MethodFacts(about["summary"], about["limitations"],
                                        options.model_dump(mode="json") if isinstance(options, BaseModel) else {})
        model = getattr(scenario, "model", None)
        return RunFacts(scenario=scenario.name, kind=self.kind, request=scenario.request.model_dump(mode="json"),
                        source=str(getattr(model, "name", "")), source_sha256=source_sha256, methods=methods)

    examples_per_epoch: int | None = None  # what one epoch of a method passes over (set by `prepare` where known)

    def optimizer_steps(self, options: BaseModel) -> int | None:
        """About how many optimizer steps `options` asks for (`steps`, or epochs over `examples_per_epoch`)."""
        steps, epochs = getattr(options, "steps", None), getattr(options, "epochs", None)
        if isinstance(steps, int):
            return steps
        batch = getattr(options, "batch_size", None)
        if isinstance(epochs, int) and isinstance(batch, int) and self.examples_per_epoch:
            return epochs * math.ceil(self.examples_per_epoch / batch)
        return None

    def load_language_model(self) -> Any:
        """The scenario's language model, moved to the job's device (sharded: its shards); sets `loaded` (files,
        hashes) and `tokenizer`."""
        from safeedit.models.language import load_language_model  # transformers: only the LM kinds need it

        model = self.scenario.model
        say(f"scenario {self.scenario.name}: loading {model.name}", self.progress)
        self.loaded = load_language_model(model.name, model.trust_remote_code, self.progress, model.dtype)
        self.tokenizer = self.loaded.tokenizer
        if self.sharded:
            self.loaded.weights_sha256  # noqa: B018 (hashed whole, before the model is cut into shards)
        return self.placed(self.loaded.model)

    def placed(self, model: Any) -> Any:
        """A loaded model on the job's device or, in a sharded job, sharded over its processes."""
        if not self.sharded:
            return model.to(self.device)
        from safeedit.models.fsdp import shard_model

        return shard_model(model, self.device)

    @property
    def writes(self) -> bool:
        """Whether this process writes the outputs (the first of a sharded job's processes, or the only one)."""
        return not self.sharded or rank_and_world()[0] == 0

    @contextmanager
    def timed_evaluation(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.evaluation_s += time.perf_counter() - start

    def timings(self, started: float, **extra: float | None) -> dict[str, float]:
        """Total run time since `started`, evaluation time, and the kind's extra timings that were measured."""
        robustness = {"robustness_s": self.robustness_s} if self.robustness_s else {}
        return {"total_s": time.perf_counter() - started, "evaluation_s": self.evaluation_s, **robustness,
                **{key: value for key, value in extra.items() if value is not None}}


def run_methods(job: Job, options: dict[str, BaseModel]) -> None:
    """Each method in turn: time it, run it on the job's setting, evaluate it, save it, keep its entry. Before
    each, the steps it asks for and, from the pace of the methods before it, the time the rest will take."""
    scenario = job.scenario
    steps = {name: job.optimizer_steps(method_options) for name, method_options in options.items()}
    done_steps, done_s = 0, 0.0
    for index, (name, method_options) in enumerate(options.items(), 1):
        spec = scenario.method_spec(name)
        size = f", about {steps[name]:,} optimizer steps" if steps[name] else ""
        say(f"method {index}/{len(options)}: {name} ({job.describe(name, spec, method_options)}{size})", job.progress)
        left = sum(n for key, n in steps.items() if n and list(options).index(key) >= index - 1)
        if done_steps and done_s > 1 and left:
            say(f"about {left * done_s / done_steps:,.0f} s of methods left at the pace so far", job.progress)
        # dropout draws from the global generator: every method starts from the scenario's seed, whatever ran
        # before it (a retrain, other methods) or did not
        torch.manual_seed(scenario.seed)
        start = time.perf_counter()
        result = spec.run(job.setting_for(name), method_options, scenario.seed, job.progress)
        wall = time.perf_counter() - start
        done_steps, done_s = done_steps + (steps[name] or 0), done_s + (wall if steps[name] else 0.0)
        entry = job.evaluate(name, result, wall)  # may override the defaults below (e.g. no wall time)
        job.results[name] = {"about": job.about(name, spec), "wall_time_s": wall, "seed": scenario.seed,
                             "options": method_options.model_dump(), "mask": None, **job.save(name, result), **entry}
        attack_result(job, name, job.attacked_model(name, result))
        del result  # an edited copy is freed before the next method makes its own (LLMs: ~0.5 GB each)


def attack_result(job: Job, name: str, model: Any, edit: bool = True) -> None:
    """Run the scenario's robustness battery on result `name` (when it asks for one and the kind has a surface):
    its flat metrics join the result's `after` metrics, the curves and tables its `robustness` entry. The
    quantization diagnostic (edited weights below half a step) is for edits of `job.unedited` only (`edit`): a
    reference (a retrained model, the aligned model, the frozen encoder) is no edit of it."""
    options = getattr(job.scenario, "robustness", None)
    if options is None or model is None or not options.attacks(name):
        return
    if not hasattr(job, "surface"):
        job.surface = job.attack_surface()
    if job.surface is None:
        return
    started = time.perf_counter()
    flat, entry = attack(job.surface, name, model, job.unedited if edit else None, options, job.scenario.seed,
                         job.progress)
    job.robustness_s += time.perf_counter() - started
    result = job.results[name]
    result["metrics"]["after"].update(flat)
    result["robustness"] = entry


# The work one scenario may ask for without `allow_long` (CLI: --allow-long): beyond it, a typo such as a billion
# epochs would run until interrupted.
WORK_LIMITS = {"epochs": 1_000, "steps": 100_000}


def check_work(scenario: BaseModel, allow_long: bool) -> None:
    """Refuse an `epochs` or `steps` value anywhere in the scenario beyond `WORK_LIMITS`, unless `allow_long`."""
    if allow_long:
        return

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                limit = WORK_LIMITS.get(key)
                if limit is not None and isinstance(item, int) and item > limit:
                    raise SafeEditError(f"{where}{key}: {item:,} is beyond the limit of {limit:,} {key}; lower it, or "
                                        "pass --allow-long to run it anyway")
                walk(item, f"{where}{key}.")

    walk(scenario.model_dump(), "")
    for name, method_options in scenario.method_options().items():
        walk(method_options.model_dump(), f"methods.{name}.")


def run_job(job: Job) -> Path:
    """Prepare, run every method, write the record; return its path."""
    started = time.perf_counter()
    options = job.scenario.method_options()
    job.prepare()
    for name, model in job.reference_models().items():
        attack_result(job, name, model, edit=False)
    run_methods(job, options)
    job.after_methods()
    record_path = job.out / "record.json"
    write_record({
        **common_record(job.scenario, job.path, job.final_out, job.device),
        **job.record_fields(started),
        "outputs": job.writer.entries,
        "results": job.results,
        "verdict": verdict(job.scenario.criteria, job.results),
    }, record_path)
    return record_path
