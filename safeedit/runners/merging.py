"""The merging runner: fine-tune one model per task from a shared body (one or more of them on backdoored data),
merge them with every method the scenario names, and measure each merge's clean accuracy per task and the attack
success rate of every trigger on every task; write masks, the DAM merge, the heads and the record.

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
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from torch import nn

from safeedit.attacks.backdoor import TriggerSpec, attack_success_rate, poison_dataset, triggered_test_set
from safeedit.criteria import verdict
from safeedit.data.forget import fingerprint
from safeedit.errors import SafeEditError
from safeedit.io import save_safetensors, sha256_file, sha256_text
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import with_parameters
from safeedit.methods import methods
from safeedit.models.encoders import (
    Encoder,
    FinetuneRecipe,
    TaskClassifier,
    finetune_task,
    linear_probe,
    load_encoder,
    loader,
    predictions,
)
from safeedit.models.shipped import SHIPPED, zoo_entries
from safeedit.record import write_record
from safeedit.runners.common import OutputWriter, cached_weights, common_record, input_entries, say
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


def run_merging(scenario: MergeScenario, path: Path, out: Path, device: torch.device, progress: bool) -> Path:
    started = time.perf_counter()
    options = scenario.method_options()
    say(f"scenario {scenario.name}: loading {scenario.model.name}", progress)
    encoder, files = load_encoder(scenario.model.name, scenario.model.modality, scenario.model.max_length, progress)
    encoder = encoder.to(device)
    base_files = {str(f): sha256_file(f) for f in files}
    base_sha = sha256_text(json.dumps(base_files, sort_keys=True))
    data = load_tasks(scenario)
    seed, tasks = scenario.seed, scenario.tasks

    train, unlabeled, test, classes = {}, {}, {}, {}
    for name, splits in data.items():
        shuffled = splits["train"].shuffle(seed=seed)
        if len(shuffled) < tasks.unlabeled + 10:
            raise SafeEditError(f"task {name!r} has {len(shuffled)} training examples; it needs more than "
                                f"unlabeled ({tasks.unlabeled}) + 10")
        unlabeled[name] = shuffled.select(range(tasks.unlabeled))
        train[name] = shuffled.select(range(tasks.unlabeled, min(len(shuffled), tasks.unlabeled + tasks.max_train)))
        test[name] = splits["test"].select(range(min(len(splits["test"]), tasks.max_test)))
        classes[name] = num_classes(splits)
    clean_train = dict(train)
    for name, spec in scenario.attacks.items():
        train[name] = poison_dataset(train[name], spec, seed)
        say(f"task {name}: {sum(train[name]['poisoned'])} of {len(train[name])} training examples poisoned "
            f"({spec.kind} trigger, target class {spec.target})", progress)
    triggered: dict[tuple[str, str], Dataset] = {}
    for attacker, spec in scenario.attacks.items():
        for name in data:
            if spec.target < classes[name]:
                triggered[attacker, name] = triggered_test_set(test[name], spec, seed)

    def measure(models: dict[str, nn.Module]) -> dict[str, float | None]:
        """Accuracy on each task's test split and the worst attack success rate of any trigger on each task."""
        metrics: dict[str, float | None] = {}
        for name, model in models.items():
            predicted, labels = predictions(model, encoder, test[name])
            metrics[f"accuracy_{name}"] = float((predicted == labels).mean())
            rates = [attack_success_rate(predictions(model, encoder, triggered[a, name])[0].tolist(), spec.target)
                     for a, spec in scenario.attacks.items() if (a, name) in triggered]
            metrics[f"asr_{name}"] = max(rates) if rates else None
        metrics["avg_accuracy"] = float(np.mean([metrics[f"accuracy_{n}"] for n in models]))
        attacked = [metrics[f"asr_{n}"] for n in scenario.attacks if metrics.get(f"asr_{n}") is not None]
        clean = [metrics[f"asr_{n}"] for n in models if n not in scenario.attacks and metrics[f"asr_{n}"] is not None]
        metrics["backdoor_asr"] = float(np.mean(attacked)) if attacked else None
        metrics["transfer_asr"] = float(np.mean(clean)) if clean else None
        return metrics

    evaluation_time = 0.0
    results: dict[str, dict[str, Any]] = {}
    say("frozen encoder: linear probes on the pretrained body (the floor a merge must stay above)", progress)
    probes = {name: TaskClassifier(encoder, linear_probe(encoder, clean_train[name], classes[name], seed))
              for name in data}
    start = time.perf_counter()
    results["frozen_encoder"] = {"metrics": {"after": measure(probes)}, "wall_time_s": None, "about": {
        "summary": "the pretrained body, frozen, with a linear probe per task on clean data: the floor",
        "limitations": "Reference only; not a method."}}
    evaluation_time += time.perf_counter() - start

    task_models, inputs, finetune_s = {}, {"base body weights": base_files}, 0.0
    for name in data:
        model, model_path, seconds = cached_task_model(encoder, base_sha, name, train[name], classes[name],
                                                       scenario.finetune, seed, scenario.attacks.get(name), progress)
        task_models[name], finetune_s = model, finetune_s + seconds
        role = f"task model {name}" + (" (backdoored, cached)" if name in scenario.attacks else " (cached)")
        inputs[role] = {str(model_path): sha256_file(model_path)}
    heads = {name: model.head for name, model in task_models.items()}
    unlabeled_batches = {n: list(loader(encoder, unlabeled[n].remove_columns("label"), tasks.batch_size,
                                        shuffle=True, seed=seed)) for n in data}
    setting = MergeSetting(encoder, {n: m.encoder for n, m in task_models.items()}, heads, unlabeled_batches)

    writer = OutputWriter(out, scenario.name, base_sha)
    heads_path = out / "task-heads.safetensors"
    save_safetensors({f"{n}.{k}": v for n, h in heads.items() for k, v in h.state_dict().items()}, heads_path,
                     {"scenario": scenario.name, "what": "per-task linear heads (kept per task, never merged)"})
    writer.add(heads_path, "task heads")
    specs = methods("merge")
    for index, (name, method_options) in enumerate(options.items(), 1):
        say(f"method {index}/{len(options)}: {name}", progress)
        start = time.perf_counter()
        spec = specs[name]
        outcome = spec.run(setting, method_options, seed, progress)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        if outcome.parameters is None:
            models = task_models
        else:
            merged = with_parameters(encoder, outcome.parameters)
            models = {n: TaskClassifier(merged, heads[n]) for n in data}
        metrics = measure(models)
        evaluation_time += time.perf_counter() - start
        entry: dict[str, Any] = {"metrics": {"after": metrics}, "wall_time_s": wall if name != "individual" else None,
                                 "seed": seed, "options": method_options.model_dump(),
                                 "about": spec.about}
        evidence: dict[str, Any] = dict(outcome.details)
        for mask_name, mask in outcome.masks.items():
            evidence[mask_name] = writer.save_mask(mask_name, mask)
        if name == "dam":
            entry["mask"] = evidence["dam-backdoor"]
            weights = out / "dam.safetensors"
            save_safetensors(merged.state_dict(), weights, {"method": name, "scenario": scenario.name})
            writer.add(weights, "merged body weights")
        elif outcome.masks:
            entry["mask"] = next(v for k, v in evidence.items() if k in outcome.masks)
        if evidence:
            entry["evidence"] = evidence
        results[name] = entry

    notes = [f"Learned merges see {tasks.unlabeled} unlabeled training-split examples per task; accuracies and "
             "attack success rates are measured on the test splits, which no method saw.",
             "Attack success rate counts triggered test inputs whose true class is not the target that are "
             "classified as the target; on a clean task it measures transfer of the trigger, and the frozen "
             "encoder's value is the rate at which the trigger alone moves predictions there (no backdoor)."]
    for name, spec in scenario.attacks.items():
        notes.append(f"Task {name!r} was backdoored: {spec.poison_rate:.0%} of its fine-tuning data carried a "
                     f"{spec.kind} trigger{' ' + repr(spec.word) if spec.kind == 'word' else ''} relabelled as "
                     f"class {spec.target}.")
    record_path = out / "record.json"
    fingerprints = {}
    for name in data:
        fingerprints.update({f"{name}_train": fingerprint(train[name]), f"{name}_test": fingerprint(test[name]),
                             f"{name}_unlabeled": fingerprint(unlabeled[name])})
    write_record({
        **common_record(scenario, path, out, device),
        "kind": "merge-backdoor-defence",
        "inputs": input_entries(path, inputs),
        "outputs": writer.entries,
        "data": fingerprints,
        "model": {"source": scenario.model.name, "modality": scenario.model.modality,
                  "origin": SHIPPED if scenario.model.name in zoo_entries() else "folder or hub",
                  "weights_sha256": base_sha,
                  "tasks": {n: classes[n] for n in data}},
        "timings": {"total_s": time.perf_counter() - started, "evaluation_s": evaluation_time,
                    "finetune_s": finetune_s},
        "notes": notes,
        "results": results,
        "verdict": verdict(scenario.criteria, results),
    }, record_path)
    return record_path
