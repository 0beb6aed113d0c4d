"""The job of `kind: merge` scenarios and of `safeedit merge`: merge models a user already fine-tuned from one base
model with every method named, and measure each merge where the scenario gives data (the loop is
`safeedit.runners.job`).

What is merged and what is kept is decided once (`safeedit.merge.own`). The data-free merges (task arithmetic,
TIES, DARE) read per-model `weight` and `density`; the learned merges (AdaMerging, Concrete task arithmetic, DAM)
learn on each task's `unlabeled` texts through the user's own classifiers, each keeping its own head. With
`evaluation` sets, each merge is measured per task (the merged body with the task's own head): accuracy, and the
attack success rate of every known `trigger` on every task (`safeedit.eval.merging`). Every merge is written
(`<method>.safetensors`; `safeedit merge` writes its one merge as a save_pretrained folder, the run folder itself).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from safeedit.attacks.backdoor import check_target, triggered_test_set
from safeedit.data.forget import fingerprint
from safeedit.data.sources import DataSpec, load_data
from safeedit.errors import SafeEditError
from safeedit.eval.merging import task_metrics
from safeedit.eval.weights import weight_changes
from safeedit.io import atomic_dir, check_output_path, write_text_atomic
from safeedit.merge.methods import LEARNED
from safeedit.merge.own import (
    ClassifierSetting,
    OwnModels,
    SequenceClassifier,
    is_classifier,
    load_own_models,
    storage_dtype,
)
from safeedit.merge.setting import MergeSetting
from safeedit.methods import EditResult
from safeedit.models.encoders import TextEncoder, loader
from safeedit.models.export import write_model_folder
from safeedit.progress import say
from safeedit.record import file_entry
from safeedit.report.model_card import render_model_card
from safeedit.robustness import AttackSurface
from safeedit.robustness.merging import (
    MergeBattery,
    MergedTasks,
    backdoored_only,
    held_count,
    poisoned_copies,
    sample_rows,
)
from safeedit.runners.job import Job, check_work, run_job
from safeedit.runners.merging import merge_evidence
from safeedit.scenario import ModelMergeScenario

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def task_rows(spec: str, where: str, labelled: bool) -> Dataset:
    """The rows of a task's data spec with a `text` column (and integer `label`s if `labelled`; an unlabeled set's
    labels are dropped) and an `id` column (row numbers when the file has none)."""
    rows = load_data(spec)
    needed = ["text", "label"] if labelled else ["text"]
    missing = [column for column in needed if column not in rows.column_names]
    if missing:
        raise SafeEditError(f"{where} ({spec}) has no {' or '.join(repr(c) for c in missing)} column (it has "
                            f"{', '.join(rows.column_names)}); a text task's rows are {{\"text\": ...}}"
                            + (', with an integer "label"' if labelled else ""))
    if labelled and any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in rows["label"]):
        raise SafeEditError(f"{where} ({spec}): every label must be a class number 0, 1, ...")
    if not labelled:
        rows = rows.remove_columns([c for c in rows.column_names if c not in ("text", "id")])
    if "id" not in rows.column_names:
        rows = rows.add_column("id", list(range(len(rows))))
    return rows


class ModelMergeJob(MergeBattery, Job):
    kind = "model-merge"
    scenario: ModelMergeScenario

    def __init__(self, *args: Any, command: list[str] | None = None, model_folder: bool = False,
                 notes: list[str] | None = None, **kwargs: Any) -> None:
        """`command`: the command line the record names (default `safeedit run`); `model_folder`: write the one
        merge as a save_pretrained folder into the run folder (`safeedit merge`); `notes`: the caller's own."""
        super().__init__(*args, **kwargs)
        self.command, self.model_folder, self.extra_notes = command, model_folder, notes or []
        self.merged: tuple[str, nn.Module] | None = None  # the last merge, built in evaluate and written in save

    # --- preparing -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        scenario, progress = self.scenario, self.progress
        self.entries = scenario.tasks()
        self.unlabeled = {name: task_rows(entry.unlabeled, f"models[{i}].unlabeled", labelled=False)
                          for i, (name, entry) in enumerate(self.entries.items()) if entry.unlabeled}
        self.evaluation = {name: task_rows(entry.evaluation, f"models[{i}].evaluation", labelled=True)
                           for i, (name, entry) in enumerate(self.entries.items()) if entry.evaluation}
        self.triggers = {name: entry.trigger for name, entry in self.entries.items() if entry.trigger}
        say(f"scenario {scenario.name}: loading {scenario.base_model} and {len(self.entries)} task models", progress)
        self.own: OwnModels = load_own_models(scenario.base_model, {n: e.model for n, e in self.entries.items()},
                                              scenario.exclude, scenario.merge_heads, scenario.trust_remote_code,
                                              progress)
        for loaded in (self.own.base, *self.own.tasks.values()):
            loaded.model.to(self.device).eval()
        self.dtype = scenario.dtype or storage_dtype(scenario.base_model)
        weights = {name: entry.weight for name, entry in self.entries.items()}
        densities = {name: entry.density for name, entry in self.entries.items() if entry.density is not None}
        parts = {name: self.own.task_part(name) for name in self.entries}
        if self.unlabeled or self.evaluation:
            self.merge_setting: MergeSetting = self._classifier_setting(parts, weights, densities or None)
        else:
            self.merge_setting = MergeSetting(self.own.base_part(), parts, {}, {}, weights, densities or None)
        self.writer = self.output_writer(self.own.base.weights_sha256, [self.own.base.tokenizer])

    def _classifier_setting(self, parts: dict, weights: dict, densities: dict | None) -> ClassifierSetting:
        """The learned merges' and the evaluation's setting: the task models as sequence classifiers."""
        scenario = self.scenario
        for index, (name, loaded) in enumerate(self.own.tasks.items()):
            if not is_classifier(loaded.model) or not hasattr(loaded.model, "num_labels"):
                uses = "evaluation sets" if self.evaluation else f"methods {', '.join(m for m in LEARNED)}"
                raise SafeEditError(f"models[{index}] ({name}) is a {type(loaded.model).__name__}; {uses} take text "
                                    "classifiers (AutoModelForSequenceClassification); drop them to merge any "
                                    "model data-free (task_arithmetic, ties, dare)")
        tokenizer = self.own.base.tokenizer or next((t.tokenizer for t in self.own.tasks.values() if t.tokenizer),
                                                    None)
        if tokenizer is None:
            raise SafeEditError(f"{scenario.base_model}: no tokenizer; save the base model's tokenizer with "
                                "save_pretrained next to it")
        self.encoder = TextEncoder(self.own.base.model, tokenizer, scenario.max_length)
        self.classifiers = {name: SequenceClassifier(loaded.model) for name, loaded in self.own.tasks.items()}
        for index, (name, rows) in enumerate(self.evaluation.items()):
            classes = self.own.tasks[name].model.num_labels
            if max(rows["label"]) >= classes:
                raise SafeEditError(f"models[{index}].evaluation: label {max(rows['label'])} is not a class of "
                                    f"{name}, which has {classes} (0 to {classes - 1})")
        self.triggered = self.triggered_sets(self.evaluation)
        batches = {name: list(loader(self.encoder, rows, scenario.batch_size, shuffle=True, seed=scenario.seed))
                   for name, rows in self.unlabeled.items()}
        renames = {task: {name: f"model.{own}" for name, own in mapping.items()}
                   for task, mapping in self.own.names.items()}
        return ClassifierSetting(self.own.base_part(), parts, self.classifiers, batches, weights, densities,
                                 renames=renames, space=self.encoder)

    def triggered_sets(self, evaluation: dict[str, Dataset]) -> dict[tuple[str, str], Dataset]:
        """Each trigger's triggered copy of every evaluation set that has its target class."""
        triggered: dict[tuple[str, str], Dataset] = {}
        for attacker, spec in self.triggers.items():
            for name, rows in evaluation.items():
                if spec.target < self.own.tasks[name].model.num_labels:
                    triggered[attacker, name] = triggered_test_set(rows, spec, self.scenario.seed)
                elif name == attacker:
                    check_target(spec, self.own.tasks[name].model.num_labels)
        return triggered

    @property
    def setting(self) -> MergeSetting:
        return self.merge_setting

    # --- each method -----------------------------------------------------------------------------------------
    def models_of(self, result: EditResult) -> dict[str, nn.Module]:
        """Each evaluated task's model under a merge (the merged parameters, its own head), or the task models
        themselves (`individual`)."""
        if result.parameters is None:
            return {name: self.classifiers[name] for name in self.evaluation}
        return {name: SequenceClassifier(self.own.task_model(name, result.parameters)) for name in self.evaluation}

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        with self.timed_evaluation():
            metrics = (task_metrics(self.models_of(result), self.encoder, self.evaluation, self.triggered,
                                    self.triggers) if self.evaluation else {})
            if result.parameters is not None:
                merged = self.own.merged_model(result.parameters)
                entry["weight_changes"] = weight_changes(self.own.base.model, merged)
                self.merged = (name, merged.to(DTYPES[self.dtype]))
        entry["metrics"] = {"after": metrics}
        if name == "individual":
            entry["wall_time_s"] = None  # nothing was merged: the task models are the inputs
        return entry

    def save(self, name: str, result: EditResult) -> dict[str, Any]:
        """Masks and details (`merge_evidence`), and the merge: `<name>.safetensors`, or (`model_folder`) a
        save_pretrained folder with the base model's tokenizer, written into the run folder itself."""
        fields = merge_evidence(self.writer, name, result)
        if self.merged is None or self.merged[0] != name:
            return fields
        model, self.merged = self.merged[1], None
        if not self.model_folder:
            self.writer.save_model(name, model, None, role="merged model folder")
            return fields
        before = {path for path in self.out.rglob("*")}
        written = write_model_folder(self.out, model, self.writer.processors)  # the run folder is the model folder
        write_text_atomic(self.out / "README.md", render_model_card(self.writer.run, name, written, inside=True))
        summary = self.out / "merge.json"
        summary.write_text(json.dumps(self.summary(name, result), indent=2) + "\n")
        for path in sorted(p for p in self.out.rglob("*") if p.is_file() and p not in before):
            role = "merge summary" if path == summary else "merged model"
            self.writer.add(path, role)
        return fields

    def summary(self, name: str, result: EditResult) -> dict[str, Any]:
        """merge.json: the method and every option value used (never a default left unsaid), and the inputs."""
        options = self.scenario.method_options()[name].model_dump()
        return {"method": name, "scale": options.get("scale"), "keep": options.get("keep"),
                "trim": options.get("trim"), "density": options.get("density"),
                "seed": self.scenario.seed if name == "dare" else None, "exclude": self.scenario.exclude,
                "options": options, "dtype": self.dtype,
                "base": {self.scenario.base_model: self.own.base.weights_sha256},
                "tasks": {entry.model: self.own.tasks[task].weights_sha256 for task, entry in self.entries.items()},
                "weights": {task: entry.weight for task, entry in self.entries.items()},
                "densities": {task: entry.density for task, entry in self.entries.items()},
                "merged_tensors": len(self.own.merged), "excluded": self.own.excluded}

    # --- the robustness battery (safeedit.robustness.merging) --------------------------------------------------
    def merged_tasks(self, parameters: dict) -> MergedTasks:
        """Every evaluated task's classifier under merged `parameters`, sharing one merged body."""
        return MergedTasks(self.own.merged_model(parameters), {n: self.classifiers[n] for n in self.evaluation},
                           self.merge_setting.renames)

    def attack_surface(self) -> AttackSurface:
        """The attacker holds `forget_share` of the evaluation rows of each model with a trigger (rows outside the
        target class), as poisoned copies and as they are (`safeedit.robustness.merging`); the battery measures on
        the other rows, so its figures at step 0 can differ a little from the run's."""
        options, seed = self.scenario.robustness, self.scenario.seed
        poisoned, clean, measured = {}, {}, dict(self.evaluation)
        for name, spec in self.triggers.items():
            rows = self.evaluation[name]
            outside = np.flatnonzero(np.asarray(rows["label"]) != spec.target)
            held, measured[name] = sample_rows(rows, held_count(len(outside), options.forget_share), seed, outside)
            poisoned[name], clean[name] = poisoned_copies(held, spec, seed), held
        triggered = backdoored_only(self.triggered_sets(measured), self.triggers)
        shown = ", ".join(f"{len(clean[n])} of the {len(self.evaluation[n])} evaluation rows of {n}" for n in clean)
        about = (f"the attacker holds {shown} (poisoned copies and the rows themselves); backdoor ASR and accuracy "
                 "measured on the other evaluation rows")

        def measure(models: dict[str, nn.Module]) -> dict[str, float | None]:
            return task_metrics(models, self.encoder, measured, triggered, self.triggers)

        return self.battery_surface(measure, poisoned, clean, about)

    # --- the record ------------------------------------------------------------------------------------------
    def record_fields(self, started: float) -> dict[str, Any]:
        scenario, own = self.scenario, self.own
        inputs = [file_entry(self.path, "scenario" if self.command is None else "merge configuration")
                  ] if self.path is not None else []
        roles = {"base model": own.base, **{f"task model {task}": own.tasks[task] for task in self.entries}}
        inputs += [file_entry(path, role, sha256=digest) for role, loaded in roles.items()
                   for path, digest in loaded.files.items()]
        data = {}
        for role, sets in (("unlabeled", self.unlabeled), ("evaluation", self.evaluation)):
            for task, rows in sets.items():
                data[f"{task}_{role}"] = fingerprint(rows)
                source = Path(DataSpec.parse(getattr(self.entries[task], role)).source)
                if source.is_file():
                    inputs.append(file_entry(source, f"{role} data {task}"))
        return {
            "kind": self.kind,
            "inputs": inputs,
            "data": data,
            "model": {"source": scenario.base_model, "origin": own.base.origin,
                      "weights_sha256": own.base.weights_sha256, "dtype": self.dtype, "arithmetic": "float32",
                      "tasks": {task: {"source": entry.model, "weights_sha256": own.tasks[task].weights_sha256,
                                       "weight": entry.weight, "density": entry.density}
                                for task, entry in self.entries.items()},
                      "merged_tensors": own.merged, "excluded": own.excluded},
            "timings": self.timings(started),
            "notes": self.notes(),
            **({"command": shlex.join(self.command)} if self.command is not None else {}),
        }

    def notes(self) -> list[str]:
        own, methods = self.own, set(self.scenario.methods)
        notes = [*self.extra_notes,
                 f"{len(own.merged)} parameter tensors of {self.scenario.base_model} were merged, in float32; the "
                 f"merges are written as {self.dtype}."]
        if own.excluded:
            heads = sum("classifier head" in why for why in own.excluded.values())
            notes.append(f"{len(own.excluded)} parameter tensors were not merged (model.excluded gives each reason)"
                         + (f", {heads} of them classifier heads, which each task model keeps" if heads else "")
                         + "; the merged model has the base model's values there.")
        if methods & set(LEARNED) and any(e.weight != 1 or e.density is not None for e in self.entries.values()):
            notes.append("Per-model weight and density apply to task_arithmetic, ties and dare; adamerging, "
                         "concrete_ta and dam learn their own coefficients and masks.")
        if self.unlabeled:
            counts = ", ".join(f"{task} {len(rows)}" for task, rows in self.unlabeled.items())
            notes.append(f"The learned merges saw only the unlabeled texts ({counts}), never the evaluation sets.")
        if not self.evaluation:
            notes.append("No evaluation sets were given: no accuracy is measured; the weight changes against the "
                         "base model are what the record shows of each merge.")
        for task, spec in self.triggers.items():
            notes.append(f"Task model {task!r} may carry a {spec.kind} trigger"
                         f"{' ' + repr(spec.word) if spec.kind == 'word' else ''} towards class {spec.target}: its "
                         "attack success rate is measured on every evaluation set with that class.")
        return notes


def run_merge(scenario: ModelMergeScenario, out: Path, source: Path | None, command: list[str],
              pdf: bool = False, notes: list[str] | None = None) -> Path:
    """`safeedit merge`: the scenario's one data-free merge into a new folder `out`, a save_pretrained folder that
    is also a run folder (record, report, manifest); written whole or not at all, with no step lines (a data-free
    merge takes seconds; the command prints its summary). Returns the record's path."""
    from safeedit.report import write_report

    if out.exists():
        raise SafeEditError(f"{out} exists; choose a new output folder (nothing is overwritten)")
    check_output_path(out, folder=True)
    check_work(scenario, allow_long=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with atomic_dir(out) as work:
        job = ModelMergeJob(scenario, source, work, device, False, final_out=out, command=command,
                            model_folder=True, notes=notes)
        record = run_job(job)
        write_report(record, pdf=pdf, shown_folder=out)
    return out / record.name
