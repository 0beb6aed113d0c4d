"""The classification job: forget data from a classifier, compare every method with a model retrained without it,
and write weights, masks and the record (the loop itself is `safeedit.runners.job`)."""

from __future__ import annotations

import time
from typing import Any

from safeedit.data import make_loader
from safeedit.data.forget import split_forget
from safeedit.data.sources import load_train_test
from safeedit.errors import SafeEditError
from safeedit.eval.classification import evaluate_classifier, gap_to_retrain, mia_is_informative
from safeedit.eval.weights import weight_changes
from safeedit.methods import EditResult
from safeedit.models import EMBEDDED_MODELS, load_model
from safeedit.models.adapters import untrained_like
from safeedit.progress import say
from safeedit.runners.common import data_fingerprints, input_entries
from safeedit.runners.job import Job
from safeedit.scenario import Scenario
from safeedit.unlearn.methods import UnlearnTask, retrain


class ClassificationJob(Job):
    kind = "classification-unlearning"
    scenario: Scenario

    def prepare(self) -> None:
        scenario, progress = self.scenario, self.progress
        say(f"scenario {scenario.name}: loading model {scenario.model.name}", progress)
        self.loaded = load_model(scenario.model.name, scenario.model.weights,
                                 trust_remote_code=scenario.model.trust_remote_code, progress=progress)
        self.original = original = self.loaded.model.to(self.device)
        train, self.test, test_note = load_train_test(scenario.data.source, scenario.data.train_split,
                                                      scenario.data.test_split, scenario.seed)
        self.test_note = test_note
        self.split = split = split_forget(train, scenario.forget)
        self.examples_per_epoch = len(split.retain)  # most objectives pass over the retain set (GA: forget, fewer)
        say(f"forget {len(split.forget)} / retain {len(split.retain)} / test {len(self.test)} examples", progress)
        self.eval_loaders = {name: self.loader(data, scenario.evaluation.batch_size) for name, data in
                             (("forget", split.forget), ("retain", split.retain), ("test", self.test))}
        entry = EMBEDDED_MODELS.get(scenario.model.name)
        recipe = (scenario.model.recipe.model_dump() if scenario.model.recipe else
                  {"epochs": entry.epochs, "lr": entry.lr, "batch_size": entry.batch_size} if entry else {})
        self.task = UnlearnTask(
            model=original, forget=split.forget, retain=split.retain, num_classes=_num_classes(original),
            loader=self.loader, build_fresh=entry.build if entry else lambda: untrained_like(original),
            seed=scenario.seed, progress=progress,
        )
        self.results["original"] = {**self.measure(original, "original"), "wall_time_s": None}
        self.original_metrics = self.results["original"]["metrics"]["after"]
        self.writer = self.output_writer(self.loaded.weights_sha256)
        self.retrain_s = None
        if scenario.retrain is not None:
            say("retraining from scratch on the retain set (the reference)", progress)
            start = time.perf_counter()
            reference = retrain(self.task, scenario.retrain, recipe).model
            self.retrain_s = time.perf_counter() - start
            self.results["retrain"] = {**self.measure(reference, "retrain"), "wall_time_s": self.retrain_s,
                                       "seed": scenario.seed + scenario.retrain.seed_offset}
            self.writer.save_model("retrain", reference, None)

    def loader(self, data, batch_size: int, shuffle: bool = False, seed: int = 0):
        return make_loader(data, self.original, self.loaded.tokenizer, batch_size, shuffle=shuffle, seed=seed,
                           image_processor=self.loaded.image_processor)

    @property
    def setting(self) -> UnlearnTask:
        return self.task

    def measure(self, model, name: str) -> dict[str, Any]:
        """Metrics (after) and plot evidence of `model`."""
        with self.timed_evaluation():
            evaluation = evaluate_classifier(model, *self.eval_loaders.values(), seed=self.scenario.seed,
                                             max_mia_examples=self.scenario.evaluation.max_mia_examples)
        entry = {"metrics": {"after": evaluation.metrics}, "evidence": evaluation.evidence}
        return {**entry, "about": self.references[name]} if name in self.references else entry

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        entry = self.measure(result.model, name)
        after = entry["metrics"]["after"]
        if "retrain" in self.results:
            after["gap_to_retrain"] = gap_to_retrain(after, self.results["retrain"]["metrics"]["after"])
            after["time_vs_retrain"] = wall_s / self.retrain_s
        entry["metrics"]["before"] = self.original_metrics
        return {**entry, "weight_changes": weight_changes(self.original, result.model, result.mask)}

    def record_fields(self, started: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "inputs": input_entries(self.path, {"model weights": self.loaded.files}),
            "data": data_fingerprints(self.split, self.test),
            "model": {"source": self.scenario.model.name, "origin": self.loaded.origin,
                      "weights_sha256": self.loaded.weights_sha256},
            "timings": self.timings(started, retrain_s=self.retrain_s),
            "notes": self.notes(),
            "mia_informative": mia_is_informative(self.original_metrics),
        }

    def notes(self) -> list[str]:
        notes, original = [self.test_note] if self.test_note else [], self.original_metrics
        if not mia_is_informative(original):
            notes.append(
                f"The SVC membership attack tells retain from test examples of the original model only "
                f"{original['mia_attack_accuracy']:.0%} of the time (50% = guessing), so MIA-efficacy carries "
                f"little evidence here; the log-odds attack AUC (retain vs test "
                f"{original['mia_auc_retain_vs_test']:.2f}) shows how much power any such attack has."
            )
        if self.scenario.retrain is None:
            notes.append("No model was retrained without the forget data, so closeness to exact unlearning is "
                         "unknown.")
        return notes


def _num_classes(model) -> int:
    config = getattr(model, "config", None)
    for attribute in ("num_classes", "num_labels"):
        if isinstance(getattr(config, attribute, None), int):
            return getattr(config, attribute)
    raise SafeEditError("cannot tell the number of classes; give the model a config with num_labels")
