"""The merging job: fine-tune one model per task from a shared body (one or more of them on backdoored data),
merge them with every method the scenario names, and measure each merge's clean accuracy per task and the attack
success rate of every trigger on every task; write masks, the DAM merge, the heads and the record (the loop itself
is `safeedit.runners.job`).

Data roles per task, all disjoint: `train` fine-tunes the task model (poisoned for attacked tasks), `unlabeled`
(more train-split examples, labels dropped) is all the learned merges see, `test` is where everything is measured.
Task models are cached (they are the setting, not the defence), keyed by everything that made them.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, load_from_disk
from torch import nn

from safeedit.attacks.backdoor import TriggerSpec, poison_dataset, triggered_test_set
from safeedit.data.forget import fingerprint
from safeedit.errors import SafeEditError
from safeedit.eval.merging import task_metrics
from safeedit.io import save_safetensors, sha256_file, sha256_text
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import with_parameters
from safeedit.methods import EditResult
from safeedit.models.cache import cached_weights
from safeedit.models.encoders import (
    Encoder,
    FinetuneRecipe,
    TaskClassifier,
    finetune_task,
    linear_probe,
    load_encoder,
    loader,
)
from safeedit.models.shipped import SHIPPED, zoo_entries
from safeedit.progress import say
from safeedit.robustness import AttackSurface
from safeedit.robustness.merging import MergeBattery, MergedTasks, backdoored_only, held_count, sample_rows
from safeedit.runners.common import OutputWriter, input_entries
from safeedit.runners.job import Job
from safeedit.scenario import MergeScenario


def load_tasks(scenario: MergeScenario) -> dict[str, DatasetDict]:
    """Embedded task names (text or image, by the body's modality) or `save_to_disk` folders with train/test."""
    tasks = scenario.tasks
    wanted = tasks.max_train + tasks.unlabeled
    if scenario.model.modality == "text":
        from safeedit.data.text_tasks import TEXT_TASKS as EMBEDDED
        from safeedit.data.text_tasks import text_task as embedded
    else:
        from safeedit.data.vision_tasks import VISION_TASKS as EMBEDDED
        from safeedit.data.vision_tasks import vision_task as embedded
    loaded = {}
    for name in tasks.names:
        if name in EMBEDDED:
            loaded[name] = embedded(name, max_train=wanted, max_test=tasks.max_test, seed=scenario.seed)
        elif Path(name).is_dir():
            data = load_from_disk(name)
            if not isinstance(data, DatasetDict) or not {"train", "test"} <= set(data):
                raise SafeEditError(f"task {name!r}: a task folder holds a DatasetDict with train and test splits")
            loaded[name] = data
        else:
            raise SafeEditError(f"unknown task {name!r}; choose from {', '.join(EMBEDDED)} or a save_to_disk folder")
        column = "text" if scenario.model.modality == "text" else "pixel_values"
        for split in ("train", "test"):
            missing = {"id", "label", column} - set(loaded[name][split].column_names)
            if missing:
                raise SafeEditError(f"task {name!r} ({split}) lacks column(s) {sorted(missing)}; a "
                                    f"{scenario.model.modality} task needs id, {column} and label")
    return loaded


def num_classes(data: DatasetDict) -> int:
    feature = data["train"].features["label"]
    return feature.num_classes if hasattr(feature, "num_classes") else int(max(data["train"]["label"])) + 1


def cached_task_model(encoder: Encoder, base_sha256: str, task: str, train: Dataset, classes: int,
                      recipe: FinetuneRecipe, seed: int, attack: TriggerSpec | None, progress: bool
                      ) -> tuple[TaskClassifier, Path, float]:
    """Fine-tune (or load the cached fine-tune of) one task model; returns it, its file and the seconds spent."""
    key = {"base": base_sha256, "task": task, "ids": fingerprint(train)["ids_sha256"], "classes": classes,
           "poisoned": int(sum(train["poisoned"])) if "poisoned" in train.column_names else 0,
           "recipe": recipe.model_dump(), "seed": seed, "attack": attack.model_dump() if attack else None,
           "max_length": getattr(encoder, "max_length", None),
           "layout": [[name, list(t.shape)] for name, t in encoder.state_dict().items()]}
    label = f"{task}{'-backdoored' if attack else ''}"

    def empty() -> nn.Module:
        device = next(encoder.parameters()).device
        return TaskClassifier(copy.deepcopy(encoder), nn.Linear(encoder.feature_dim, classes)).to(device)

    def train_model() -> nn.Module:
        say(f"task model {label}: fine-tuning on {len(train)} examples (cached afterwards)", progress)
        clean_columns = train.remove_columns([c for c in ("poisoned",) if c in train.column_names])
        return finetune_task(encoder, clean_columns, classes, recipe, seed, progress, f"fine-tuning {label}")

    start = time.perf_counter()
    model, path, cached = cached_weights("merge", label, key, empty, train_model,
                                         {"task": task, "base_weights_sha256": base_sha256,
                                          "backdoored": str(attack is not None)}, progress)
    return model, path, 0.0 if cached else time.perf_counter() - start


def merge_evidence(writer: OutputWriter, name: str, result: EditResult) -> dict[str, Any]:
    """The entry fields a merge's masks and details give: each mask written by name (`dam-shared`, `dam-backdoor`,
    ...) and, with the details, the entry's evidence; the entry's mask is DAM's backdoor-detection mask (M2, what
    the defence removes), else the method's first."""
    evidence: dict[str, Any] = dict(result.details)
    for mask_name, mask in result.masks.items():
        evidence[mask_name] = writer.save_mask(mask_name, mask)
    mask = evidence["dam-backdoor"] if name == "dam" else next((evidence[k] for k in result.masks), None)
    return {"mask": mask, **({"evidence": evidence} if evidence else {})}


class MergeJob(MergeBattery, Job):
    kind = "merge-backdoor-defence"
    scenario: MergeScenario

    def prepare(self) -> None:
        scenario, progress, seed, tasks = self.scenario, self.progress, self.scenario.seed, self.scenario.tasks
        say(f"scenario {scenario.name}: loading {scenario.model.name}", progress)
        encoder, files = load_encoder(scenario.model.name, scenario.model.modality, scenario.model.max_length,
                                      progress)
        self.encoder = encoder = encoder.to(self.device)
        self.base_files = {str(f): sha256_file(f) for f in files}
        # By file name, not path: the same weights hash the same wherever safeedit or the model is installed.
        self.base_sha = sha256_text(json.dumps({Path(f).name: digest for f, digest in self.base_files.items()},
                                               sort_keys=True))
        data = load_tasks(scenario)
        self.task_names = list(data)

        self.train, self.unlabeled, self.test, self.classes = {}, {}, {}, {}
        for name, splits in data.items():
            shuffled = splits["train"].shuffle(seed=seed)
            if len(shuffled) < tasks.unlabeled + 10:
                raise SafeEditError(f"task {name!r} has {len(shuffled)} training examples; it needs more than "
                                    f"unlabeled ({tasks.unlabeled}) + 10")
            self.unlabeled[name] = shuffled.select(range(tasks.unlabeled))
            self.train[name] = shuffled.select(range(tasks.unlabeled,
                                                     min(len(shuffled), tasks.unlabeled + tasks.max_train)))
            self.test[name] = splits["test"].select(range(min(len(splits["test"]), tasks.max_test)))
            self.classes[name] = num_classes(splits)
        clean_train = dict(self.train)
        for name, spec in scenario.attacks.items():
            self.train[name] = poison_dataset(self.train[name], spec, seed)
            say(f"task {name}: {sum(self.train[name]['poisoned'])} of {len(self.train[name])} training examples "
                f"poisoned ({spec.kind} trigger, target class {spec.target})", progress)
        self.triggered: dict[tuple[str, str], Dataset] = {}
        for attacker, spec in scenario.attacks.items():
            for name in data:
                if spec.target < self.classes[name]:
                    self.triggered[attacker, name] = triggered_test_set(self.test[name], spec, seed)

        say("frozen encoder: linear probes on the pretrained body (the floor a merge must stay above)", progress)
        self.probes = {name: linear_probe(encoder, clean_train[name], self.classes[name], seed) for name in data}
        probes = {name: TaskClassifier(encoder, probe) for name, probe in self.probes.items()}
        with self.timed_evaluation():
            self.results["frozen_encoder"] = {"metrics": {"after": self.measure(probes)}, "wall_time_s": None,
                                              "about": self.references["frozen_encoder"]}

        self.task_models, self.inputs, self.finetune_s = {}, {"base body weights": self.base_files}, 0.0
        for name in data:
            model, model_path, seconds = cached_task_model(encoder, self.base_sha, name, self.train[name],
                                                           self.classes[name], scenario.finetune, seed,
                                                           scenario.attacks.get(name), progress)
            self.task_models[name], self.finetune_s = model, self.finetune_s + seconds
            role = f"task model {name}" + (" (backdoored, cached)" if name in scenario.attacks else " (cached)")
            self.inputs[role] = {str(model_path): sha256_file(model_path)}
        self.heads = {name: model.head for name, model in self.task_models.items()}
        unlabeled_batches = {n: list(loader(encoder, self.unlabeled[n].remove_columns("label"), tasks.batch_size,
                                            shuffle=True, seed=seed)) for n in data}
        self.merge_setting = MergeSetting(encoder, {n: m.encoder for n, m in self.task_models.items()}, self.heads,
                                          unlabeled_batches)

        self.writer = self.output_writer(self.base_sha, processors=[getattr(encoder, "tokenizer", None)])
        heads_path = self.out / "task-heads.safetensors"
        save_safetensors({f"{n}.{k}": v for n, h in self.heads.items() for k, v in h.state_dict().items()},
                         heads_path, {"scenario": scenario.name,
                                      "what": "per-task linear heads (kept per task, never merged)"})
        self.writer.add(heads_path, "task heads")

    @property
    def setting(self) -> MergeSetting:
        return self.merge_setting

    def measure(self, models: dict[str, nn.Module]) -> dict[str, float | None]:
        """Accuracy on each task's test split and the worst attack success rate of any trigger on each task."""
        return task_metrics(models, self.encoder, self.test, self.triggered, self.scenario.attacks)

    def models_of(self, result: EditResult) -> dict[str, nn.Module]:
        """Each task's model under a merge: the merged body with the task's own head (`individual`, which merges
        nothing: the task models themselves)."""
        if result.parameters is None:
            return self.task_models
        merged = with_parameters(self.encoder, result.parameters)
        return {n: TaskClassifier(merged, self.heads[n]) for n in self.task_names}

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        with self.timed_evaluation():
            entry: dict[str, Any] = {"metrics": {"after": self.measure(self.models_of(result))}}
        if name == "individual":
            entry["wall_time_s"] = None  # the task models are the setting (fine-tuned and cached before the run)
        return entry

    def save(self, name: str, result: EditResult) -> dict[str, Any]:
        """The method's masks and details (`merge_evidence`). DAM's merged body is written (the defence's output);
        the other merges follow from the recorded inputs, options and seed."""
        fields = merge_evidence(self.writer, name, result)
        if name == "dam":
            merged = with_parameters(self.encoder, result.parameters)
            self.writer.save_model(name, merged.model, None, role="merged body folder")
        return fields

    # --- the robustness battery (safeedit.robustness.merging) --------------------------------------------------
    def merged_tasks(self, parameters: dict | None) -> MergedTasks:
        """Every task's model under merged `parameters` (None: the pretrained body, with the linear probes)."""
        if parameters is None:
            return MergedTasks(self.encoder, self.probes)
        return MergedTasks(with_parameters(self.encoder, parameters), self.heads)

    def reference_models(self) -> dict[str, Any]:
        """The frozen encoder: how fast a model that never had the backdoor learns it from the attacker's data."""
        return {"frozen_encoder": self.merged_tasks(None)}

    def attack_surface(self) -> AttackSurface:
        """The attacker holds `forget_share` of each backdoored task's poisoned fine-tuning examples and as many of
        its clean ones (`safeedit.robustness.merging`); everything is measured on the test splits, as the run."""
        options, seed = self.scenario.robustness, self.scenario.seed
        poisoned, clean = {}, {}
        for name in self.scenario.attacks:
            rows = self.train[name]
            flags = np.asarray(rows["poisoned"], dtype=bool)
            dirty, fine = np.flatnonzero(flags), np.flatnonzero(~flags)
            poisoned[name], _ = sample_rows(rows, held_count(len(dirty), options.forget_share), seed, dirty)
            clean[name], _ = sample_rows(rows, min(len(poisoned[name]), len(fine)), seed + 1, fine)
        shown = ", ".join(f"{len(poisoned[n])} of the {int(sum(self.train[n]['poisoned']))} poisoned fine-tuning "
                          f"examples of {n}" for n in poisoned)
        about = (f"the attacker holds {shown} and as many clean ones; backdoor ASR and accuracy measured on the "
                 "test splits, as the run")
        triggered = backdoored_only(self.triggered, self.scenario.attacks)

        def measure(models: dict[str, nn.Module]) -> dict[str, float | None]:
            return task_metrics(models, self.encoder, self.test, triggered, self.scenario.attacks)

        return self.battery_surface(measure, poisoned, clean, about)

    def record_fields(self, started: float) -> dict[str, Any]:
        scenario = self.scenario
        fingerprints = {}
        for name in self.task_names:
            fingerprints.update({f"{name}_train": fingerprint(self.train[name]),
                                 f"{name}_test": fingerprint(self.test[name]),
                                 f"{name}_unlabeled": fingerprint(self.unlabeled[name])})
        return {
            "kind": self.kind,
            "inputs": input_entries(self.path, self.inputs),
            "data": fingerprints,
            "model": {"source": scenario.model.name, "modality": scenario.model.modality,
                      "origin": SHIPPED if scenario.model.name in zoo_entries() else "folder or hub",
                      "weights_sha256": self.base_sha,
                      "tasks": {n: self.classes[n] for n in self.task_names}},
            "timings": self.timings(started, finetune_s=self.finetune_s),
            "notes": self.notes(),
        }

    def notes(self) -> list[str]:
        notes = [f"Learned merges see {self.scenario.tasks.unlabeled} unlabeled training-split examples per task; "
                 "accuracies and attack success rates are measured on the test splits, which no method saw.",
                 "Attack success rate counts triggered test inputs whose true class is not the target that are "
                 "classified as the target; on a clean task it measures transfer of the trigger, and the frozen "
                 "encoder's value is the rate at which the trigger alone moves predictions there (no backdoor)."]
        for name, spec in self.scenario.attacks.items():
            notes.append(f"Task {name!r} was backdoored: {spec.poison_rate:.0%} of its fine-tuning data carried a "
                         f"{spec.kind} trigger{' ' + repr(spec.word) if spec.kind == 'word' else ''} relabelled as "
                         f"class {spec.target}.")
        return notes
