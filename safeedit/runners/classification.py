"""The classification runner: forget data from a classifier, compare every method with a model retrained
without it, and write weights, masks and the record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from safeedit.criteria import verdict
from safeedit.data import load_data, make_loader
from safeedit.data.forget import split_forget
from safeedit.errors import SafeEditError
from safeedit.eval.classification import evaluate_classifier, gap_to_retrain, mia_is_informative
from safeedit.eval.weights import weight_changes
from safeedit.methods import get_method
from safeedit.models import EMBEDDED_MODELS, load_model
from safeedit.record import write_record
from safeedit.runners.common import (
    OutputWriter,
    common_record,
    data_fingerprints,
    input_entries,
    run_timings,
    say,
)
from safeedit.scenario import Scenario
from safeedit.unlearn.methods import REFERENCE_ABOUT, UnlearnTask, retrain


def run_classification(scenario: Scenario, path: Path, out: Path, device: torch.device, progress: bool) -> Path:
    """Forget data from a classifier: every method, the retrain reference, the metrics, the record."""
    started = time.perf_counter()
    options = scenario.method_options()
    say(f"scenario {scenario.name}: loading model {scenario.model.name}", progress)
    loaded = load_model(scenario.model.name, scenario.model.weights, trust_remote_code=scenario.model.trust_remote_code,
                        progress=progress)
    original = loaded.model.to(device)
    train = load_data(f"{scenario.data.source}:{scenario.data.train_split}")
    test = load_data(f"{scenario.data.source}:{scenario.data.test_split}")
    split = split_forget(train, scenario.forget)
    say(f"forget {len(split.forget)} / retain {len(split.retain)} / test {len(test)} examples", progress)

    def loader(data, batch_size: int, shuffle: bool = False, seed: int = 0):
        return make_loader(data, original, loaded.tokenizer, batch_size, shuffle=shuffle, seed=seed,
                           image_processor=loaded.image_processor)

    eval_loaders = {name: loader(data, scenario.evaluation.batch_size) for name, data in
                    (("forget", split.forget), ("retain", split.retain), ("test", test))}
    evaluation_time = 0.0

    def evaluate(model, name: str, mask=None) -> dict[str, Any]:
        """The result entry's metrics (after), plot evidence and weight changes of `model`."""
        nonlocal evaluation_time
        start = time.perf_counter()
        evaluation = evaluate_classifier(model, eval_loaders["forget"], eval_loaders["retain"], eval_loaders["test"],
                                         seed=scenario.seed, max_mia_examples=scenario.evaluation.max_mia_examples)
        evaluation_time += time.perf_counter() - start
        about = REFERENCE_ABOUT.get(name) or get_method("classification", name).about
        entry = {"metrics": {"after": evaluation.metrics}, "evidence": evaluation.evidence, "about": about}
        if name not in ("original", "retrain"):
            entry["weight_changes"] = weight_changes(original, model, mask)
        return entry

    entry = EMBEDDED_MODELS.get(scenario.model.name)
    recipe = (scenario.model.recipe.model_dump() if scenario.model.recipe else
              {"epochs": entry.epochs, "lr": entry.lr, "batch_size": entry.batch_size} if entry else {})
    task = UnlearnTask(
        model=original, forget=split.forget, retain=split.retain, num_classes=_num_classes(original),
        loader=loader, build_fresh=entry.build if entry else lambda: type(original)(original.config),
        seed=scenario.seed, progress=progress,
    )

    results: dict[str, dict[str, Any]] = {"original": evaluate(original, "original")}
    results["original"]["wall_time_s"] = None
    original_metrics = results["original"]["metrics"]["after"]

    weights_sha256 = loaded.weights_sha256
    writer = OutputWriter(out, scenario.name, weights_sha256)

    retrain_time = None
    if scenario.retrain is not None:
        say("retraining from scratch on the retain set (the reference)", progress)
        start = time.perf_counter()
        reference = retrain(task, scenario.retrain, recipe).model
        retrain_time = time.perf_counter() - start
        results["retrain"] = {**evaluate(reference, "retrain"), "wall_time_s": retrain_time,
                              "seed": scenario.seed + scenario.retrain.seed_offset}
        writer.save("retrain", reference.state_dict(), None)

    for index, (name, method_options) in enumerate(options.items(), 1):
        spec = get_method("classification", name)
        say(f"method {index}/{len(options)}: {name} ({spec.summary})", progress)
        start = time.perf_counter()
        output = spec.run(task, method_options, scenario.seed, progress)
        wall = time.perf_counter() - start
        result = evaluate(output.model, name, output.mask)
        after = result["metrics"]["after"]
        if "retrain" in results:
            after["gap_to_retrain"] = gap_to_retrain(after, results["retrain"]["metrics"]["after"])
            after["time_vs_retrain"] = wall / retrain_time
        result["metrics"]["before"] = original_metrics
        results[name] = {**result, "wall_time_s": wall, "seed": scenario.seed, "options": method_options.model_dump(),
                         "mask": writer.save(name, output.model.state_dict(), output.mask)}

    notes = []
    mia_informative = mia_is_informative(original_metrics)
    if not mia_informative:
        notes.append(
            f"The SVC membership attack tells retain from test examples of the original model only "
            f"{original_metrics['mia_attack_accuracy']:.0%} of the time (50% = guessing), so MIA-efficacy carries "
            f"little evidence here; the log-odds attack AUC (retain vs test "
            f"{original_metrics['mia_auc_retain_vs_test']:.2f}) shows how much power any such attack has."
        )
    if scenario.retrain is None:
        notes.append("No model was retrained without the forget data, so closeness to exact unlearning is unknown.")

    record_path = out / "record.json"
    write_record({
        **common_record(scenario, path, out, device),
        "kind": "classification-unlearning",
        "inputs": input_entries(path, {"model weights": loaded.files}),
        "outputs": writer.entries,
        "data": data_fingerprints(split, test),
        "model": {"source": scenario.model.name, "origin": loaded.origin, "weights_sha256": weights_sha256},
        "timings": run_timings(started, evaluation_time, retrain_time),
        "notes": notes,
        "mia_informative": mia_informative,
        "results": results,
        "verdict": verdict(scenario.criteria, results),
    }, record_path)
    return record_path


def _num_classes(model) -> int:
    config = getattr(model, "config", None)
    for attribute in ("num_classes", "num_labels"):
        if isinstance(getattr(config, attribute, None), int):
            return getattr(config, attribute)
    raise SafeEditError("cannot tell the number of classes; give the model a config with num_labels")
