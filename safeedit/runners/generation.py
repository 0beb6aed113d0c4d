"""The generation job: forget a class in a class-conditional diffusion model (SalUn for generation), compare
with the unmasked objective and a model retrained without the class, judge samples with a separate classifier,
and write weights, masks, a grid of samples per class and the record (the loop itself is `safeedit.runners.job`)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from safeedit.data.forget import split_forget
from safeedit.data.sources import load_train_test
from safeedit.errors import SafeEditError
from safeedit.eval.generation import generation_metrics, judge_accuracy, sample_grid
from safeedit.eval.weights import weight_changes
from safeedit.methods import EditResult
from safeedit.models import load_model
from safeedit.models.diffusion import (
    EMBEDDED_DIFFUSION,
    DiffusionModel,
    DiffusionRecipe,
    image_tensors,
    load_diffusion,
    train_from_scratch,
)
from safeedit.progress import say
from safeedit.robustness import AttackSurface
from safeedit.robustness.generation import generation_surface
from safeedit.runners.common import data_fingerprints, input_entries
from safeedit.runners.job import Job
from safeedit.scenario import GenerationScenario
from safeedit.unlearn.diffusion import GenerationTask


class GenerationJob(Job):
    kind = "generation-unlearning"
    scenario: GenerationScenario

    def prepare(self) -> None:
        scenario, progress = self.scenario, self.progress
        if scenario.forget.kind != "class":
            raise SafeEditError(f"scenario '{scenario.name}': a generation scenario forgets a class "
                                "(forget.kind: class)")
        self.forget_class = forget_class = int(scenario.forget.label)
        say(f"scenario {scenario.name}: loading diffusion model {scenario.model.name}", progress)
        self.loaded = load_diffusion(scenario.model.name, progress=progress, weights=scenario.model.weights)
        self.original = original = self.loaded.model
        original.unet.to(self.device)
        self.judge_loaded = load_model(scenario.judge.name, scenario.judge.weights, progress=progress)
        self.judge = self.judge_loaded.model.to(self.device).eval()
        train, self.test, test_note = load_train_test(scenario.data.source, scenario.data.train_split,
                                                      scenario.data.test_split, scenario.seed)
        self.test_note = test_note
        if not 0 <= forget_class < original.num_classes:
            raise SafeEditError(f"forget.label {forget_class} is not a class of the model "
                                f"(0..{original.num_classes - 1})")
        self.split = split = split_forget(train, scenario.forget)
        forget, retain = image_tensors(split.forget), image_tensors(split.retain)
        self.task = GenerationTask(original, forget, retain)
        self.examples_per_epoch = len(split.forget)  # an epoch passes over the forget set
        test_images, test_labels = image_tensors(self.test)
        real_pixels = (test_images + 1) / 2
        self.judge_test_accuracy = judge_accuracy(self.judge, real_pixels, test_labels)
        self.real_retain = real_pixels[test_labels != forget_class]
        say(f"forget class {forget_class}: {len(split.forget)} training images; judge {scenario.judge.name} "
            f"{self.judge_test_accuracy:.1%} on real test images", progress)
        self.samples: dict[str, torch.Tensor] = {}  # by model name, for the sample grid

        self.writer = self.output_writer(self.loaded.weights_sha256, processors=[original.scheduler])
        self.results["original"] = {**self.measure(original, "original"), "wall_time_s": None}
        self.original_metrics = self.results["original"]["metrics"]["after"]
        self.retrain_s, self.reference_model = None, None
        if scenario.retrain is not None:
            entry = EMBEDDED_DIFFUSION.get(scenario.model.name)
            steps = scenario.retrain.steps or (entry.recipe.steps if entry else None)
            if steps is None:
                raise SafeEditError("retrain needs a step count for a non-embedded model: set retrain.steps")
            seed = scenario.seed + scenario.retrain.seed_offset
            recipe = replace(entry.recipe if entry else DiffusionRecipe(), steps=steps, seed=seed)
            say(f"retraining from scratch without class {forget_class} ({steps} steps; the reference)", progress)
            start = time.perf_counter()
            self.reference_model = reference = train_from_scratch(original, retain[0], retain[1], recipe, progress)
            self.retrain_s = time.perf_counter() - start
            self.results["retrain"] = {**self.measure(reference, "retrain"), "wall_time_s": self.retrain_s,
                                       "seed": seed}
            self.writer.save_model("retrain", reference.unet, None)

    @property
    def setting(self) -> GenerationTask:
        return self.task

    def measure(self, model: DiffusionModel, name: str) -> dict[str, Any]:
        """Metrics (after) of `model` from its samples, which the grid shows."""
        evaluation = self.scenario.evaluation
        with self.timed_evaluation():
            say(f"generating {evaluation.per_class} samples per class with {name}", self.progress)
            metrics, self.samples[name] = generation_metrics(
                model, self.judge, self.forget_class, self.real_retain, evaluation.per_class,
                evaluation.sampling_steps, evaluation.guidance, self.scenario.seed)
        entry = {"metrics": {"after": metrics}, "evidence": None}
        return {**entry, "about": self.references[name]} if name in self.references else entry

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        entry = self.measure(result.model, name)
        if self.retrain_s:
            entry["metrics"]["after"]["time_vs_retrain"] = wall_s / self.retrain_s
        entry["metrics"]["before"] = self.original_metrics
        return {**entry, "weight_changes": weight_changes(self.original.unet, result.model.unet, result.mask)}

    def reference_models(self) -> dict[str, Any]:
        reference = {"retrain": self.reference_model} if self.reference_model is not None else {}
        return {"original": self.original, **reference}

    def attack_surface(self) -> AttackSurface:
        evaluation = self.scenario.evaluation
        return generation_surface(self.task.forget, self.test, self.judge, self.forget_class,
                                  self.original.num_classes, self.scenario.robustness, self.scenario.seed,
                                  evaluation.sampling_steps, evaluation.guidance)

    def save(self, name: str, result: EditResult) -> dict[str, Any]:
        return {"mask": self.writer.save_model(name, result.model.unet, result.mask)}

    def after_methods(self) -> None:
        """The grid of every model's samples per class."""
        grid = sample_grid(self.samples, self.original.num_classes, self.out / "samples.png",
                           forget_class=self.forget_class)
        self.writer.add(grid, "sample grid")

    def record_fields(self, started: float) -> dict[str, Any]:
        scenario, loaded, judge_loaded = self.scenario, self.loaded, self.judge_loaded
        return {
            "kind": self.kind,
            "inputs": input_entries(self.path, {"model weights": loaded.files, "judge weights": judge_loaded.files}),
            "data": data_fingerprints(self.split, self.test),
            "model": {"source": scenario.model.name, "origin": loaded.origin, "weights_sha256": loaded.weights_sha256,
                      "judge": scenario.judge.name, "judge_origin": judge_loaded.origin,
                      "judge_weights_sha256": judge_loaded.weights_sha256,
                      "judge_test_accuracy": self.judge_test_accuracy},
            "timings": self.timings(started, retrain_s=self.retrain_s),
            "notes": self.notes(),
        }

    def notes(self) -> list[str]:
        notes = [f"Samples are judged by {self.scenario.judge.name}, which classifies {self.judge_test_accuracy:.1%} "
                 "of the real test images correctly; its errors on generated images count as the generator's."]
        if self.judge_test_accuracy < 0.9:
            notes.append("The judge is below 90% accuracy on real images: its verdicts on samples are weak evidence.")
        return [self.test_note, *notes] if self.test_note else notes
