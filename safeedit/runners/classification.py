"""The classification job: forget data from a classifier, compare every method with a model trained without it
(the scenario's `reference:`, `safeedit.unlearn.reference`), and write weights, masks and the record (the loop
itself is `safeedit.runners.job`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from safeedit.data import make_loader
from safeedit.data.forget import fingerprint, split_forget
from safeedit.data.sources import load_train_test
from safeedit.errors import SafeEditError
from safeedit.eval.classification import evaluate_classifier, gap_to_retrain, mia_is_informative
from safeedit.eval.weights import weight_changes
from safeedit.methods import EditResult
from safeedit.models import EMBEDDED_MODELS, load_model
from safeedit.models.adapters import untrained_like
from safeedit.models.reference import BaseStart, check_reference_architecture
from safeedit.progress import say
from safeedit.robustness import AttackSurface
from safeedit.robustness.classification import classification_surface
from safeedit.runners.common import data_fingerprints, input_entries
from safeedit.runners.job import Job
from safeedit.runners.references import (
    CLASSIFICATION_REFERENCE_NOTES,
    CLASSIFICATION_REFERENCES,
    SCRATCH_FOR_FINE_TUNED,
)
from safeedit.scenario import Scenario
from safeedit.unlearn.methods import UnlearnTask, retrain
from safeedit.unlearn.reference import FROM_BASE, FROM_SCRATCH, GIVEN, NONE, SCRATCH, ReferencePlan


class ClassificationJob(Job):
    kind = "classification-unlearning"
    scenario: Scenario

    def prepare(self) -> None:
        scenario, progress = self.scenario, self.progress
        plan = scenario.reference_plan()
        if plan.kind in (FROM_BASE, GIVEN):  # configurations only: a reference of another architecture stops here
            check_reference_architecture(scenario.model.name, plan.source,
                                         "reference.from" if plan.kind == FROM_BASE else "reference.model",
                                         scenario.model.trust_remote_code)
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
        self.task = UnlearnTask(
            model=original, forget=split.forget, retain=split.retain, num_classes=_num_classes(original),
            loader=self.loader, build_fresh=entry.build if entry else lambda: untrained_like(original),
            seed=scenario.seed, progress=progress,
        )
        self.results["original"] = {**self.measure(original, "original"), "wall_time_s": None}
        self.original_metrics = self.results["original"]["metrics"]["after"]
        if plan.kind != NONE:  # the reference row's words (and its model card's) say what was done
            self.references = {**self.references, "retrain": CLASSIFICATION_REFERENCES[plan.kind]}
        self.writer = self.output_writer(self.loaded.weights_sha256)
        self.retrain_s = None
        self.reference_files: dict[str, dict[str, str]] = {}
        self.reference = self.add_reference(plan)

    def add_reference(self, plan: ReferencePlan) -> dict[str, Any]:
        """The reference's result entry (`retrain`), its weights when trained here, and what the record says of
        it: kind, source, recipe and seed, what it was trained on."""
        if plan.kind == NONE:
            return {"kind": NONE}
        if plan.kind == GIVEN:
            say(f"loading the reference {plan.source} (trained without the forget data, as given)", self.progress)
            name = self.scenario.model.name  # an embedded model's reference is a weights file of its architecture
            given = (load_model(name, plan.source, progress=self.progress) if name in EMBEDDED_MODELS else
                     load_model(plan.source, progress=self.progress))
            self.reference_files["reference weights"] = given.files
            self.reference_model = given.model.to(self.device)
            self.results["retrain"] = {**self.measure(self.reference_model, "retrain"), "wall_time_s": None}
            return {"kind": GIVEN, "source": plan.source, "weights_sha256": given.weights_sha256}
        task, record = self.task, {"kind": plan.kind, "source": plan.source or SCRATCH, "recipe": plan.recipe()}
        if plan.kind == FROM_BASE:
            say(f"loading the base checkpoint {plan.source}", self.progress)
            base = load_model(plan.source, progress=self.progress)  # safetensors only, trust_remote_code off
            self.reference_files["reference base weights"] = base.files
            start = BaseStart.of(base.model, self.original, plan.source)
            task = dataclasses.replace(task, build_fresh=lambda: start.build(self.original))
            record["initialised"] = start.initialised
            say("fine-tuning the base on the retain set (the reference)", self.progress)
        else:
            say("retraining from scratch on the retain set (the reference)", self.progress)
        seed = self.scenario.seed + plan.options.seed_offset
        started = time.perf_counter()
        self.reference_model = model = retrain(task, plan.options, {}).model
        self.retrain_s = time.perf_counter() - started
        self.results["retrain"] = {**self.measure(model, "retrain"), "wall_time_s": self.retrain_s, "seed": seed,
                                   "options": plan.recipe()}
        self.writer.save_model("retrain", model, None)
        return {**record, "seed": seed, "trained_on": {"retain": fingerprint(self.split.retain)}}

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
            if self.retrain_s:  # a given reference was trained elsewhere: its time is unknown
                after["time_vs_retrain"] = wall_s / self.retrain_s
        entry["metrics"]["before"] = self.original_metrics
        return {**entry, "weight_changes": weight_changes(self.original, result.model, result.mask)}

    def reference_models(self) -> dict[str, Any]:
        reference = getattr(self, "reference_model", None)
        return {"original": self.original, **({"retrain": reference} if reference is not None else {})}

    def attack_surface(self) -> AttackSurface:
        return classification_surface(self.split.forget, self.test, self.loader, self.scenario.robustness,
                                      self.scenario.seed, self.scenario.forget.kind == "class")

    def record_fields(self, started: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "inputs": input_entries(self.path, {"model weights": self.loaded.files, **self.reference_files}),
            "data": data_fingerprints(self.split, self.test),
            "model": {"source": self.scenario.model.name, "origin": self.loaded.origin,
                      "weights_sha256": self.loaded.weights_sha256},
            "reference": self.reference,
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
        return [*notes, *self.reference_notes()]

    def reference_notes(self) -> list[str]:
        """What the reference was, in words, or which comparisons are missing without one."""
        reference, kind = self.reference, self.reference["kind"]
        recipe = reference.get("recipe") or {}
        text = CLASSIFICATION_REFERENCE_NOTES[kind].format(
            model=self.scenario.model.name, source=reference.get("source"), retain=len(self.split.retain),
            seed=reference.get("seed"), sha256=reference.get("weights_sha256"),
            initialised=", ".join(reference.get("initialised", [])),
            recipe=(f"{recipe.get('epochs')} epochs, lr {recipe.get('lr'):g}, batch {recipe.get('batch_size')}, "
                    f"weight decay {recipe.get('weight_decay'):g}, {recipe.get('optimizer')}") if recipe else "")
        fine_tuned = kind == FROM_SCRATCH and self.scenario.model.name not in EMBEDDED_MODELS
        return [text, SCRATCH_FOR_FINE_TUNED] if fine_tuned else [text]


def _num_classes(model) -> int:
    config = getattr(model, "config", None)
    for attribute in ("num_classes", "num_labels"):
        if isinstance(getattr(config, attribute, None), int):
            return getattr(config, attribute)
    raise SafeEditError("cannot tell the number of classes; give the model a config with num_labels")
