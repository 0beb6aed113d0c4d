"""The generation runner: forget a class in a class-conditional diffusion model (SalUn for generation), compare
with the unmasked objective and a model retrained without the class, judge samples with a separate classifier,
and write weights, masks, a grid of samples per class and the record."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from safeedit.criteria import verdict
from safeedit.data import load_data
from safeedit.data.forget import split_forget
from safeedit.errors import SafeEditError
from safeedit.eval.generation import generation_metrics, judge_accuracy, sample_grid
from safeedit.eval.weights import weight_changes
from safeedit.methods import get_method
from safeedit.models import load_model
from safeedit.models.diffusion import (
    EMBEDDED_DIFFUSION,
    DiffusionModel,
    DiffusionRecipe,
    image_tensors,
    load_diffusion,
    train_from_scratch,
)
from safeedit.record import write_record
from safeedit.runners.common import (
    OutputWriter,
    common_record,
    data_fingerprints,
    input_entries,
    run_timings,
    say,
)
from safeedit.scenario import GenerationScenario
from safeedit.unlearn.diffusion import GenerationTask

REFERENCE_ABOUT = {
    "original": {"summary": "the generator before any edit", "limitations": "Reference only; not a method."},
    "retrain": {"summary": "trained from scratch without the forget class: what exact unlearning would produce",
                "limitations": "One retrained model from one seed, trained with the original recipe."},
}


def run_generation(scenario: GenerationScenario, path: Path, out: Path, device: torch.device, progress: bool) -> Path:
    started = time.perf_counter()
    options = scenario.method_options()
    if scenario.forget.kind != "class":
        raise SafeEditError(f"scenario '{scenario.name}': a generation scenario forgets a class (forget.kind: class)")
    forget_class = int(scenario.forget.label)

    say(f"scenario {scenario.name}: loading diffusion model {scenario.model.name}", progress)
    loaded = load_diffusion(scenario.model.name, progress=progress, weights=scenario.model.weights)
    original = loaded.model
    original.unet.to(device)
    judge_loaded = load_model(scenario.judge.name, scenario.judge.weights, progress=progress)
    judge = judge_loaded.model.to(device).eval()
    train = load_data(f"{scenario.data.source}:{scenario.data.train_split}")
    test = load_data(f"{scenario.data.source}:{scenario.data.test_split}")
    if not 0 <= forget_class < original.num_classes:
        raise SafeEditError(f"forget.label {forget_class} is not a class of the model (0..{original.num_classes - 1})")
    split = split_forget(train, scenario.forget)
    forget, retain = image_tensors(split.forget), image_tensors(split.retain)
    test_images, test_labels = image_tensors(test)
    real_pixels = (test_images + 1) / 2
    judge_test_accuracy = judge_accuracy(judge, real_pixels, test_labels)
    real_retain = real_pixels[test_labels != forget_class]
    say(f"forget class {forget_class}: {len(split.forget)} training images; judge {scenario.judge.name} "
        f"{judge_test_accuracy:.1%} on real test images", progress)

    samples: dict[str, torch.Tensor] = {}
    evaluation_time = 0.0
    evaluation = scenario.evaluation

    def evaluate(model: DiffusionModel, name: str) -> dict[str, Any]:
        nonlocal evaluation_time
        start = time.perf_counter()
        say(f"generating {evaluation.per_class} samples per class with {name}", progress)
        metrics, samples[name] = generation_metrics(model, judge, forget_class, real_retain, evaluation.per_class,
                                                    evaluation.sampling_steps, evaluation.guidance, scenario.seed)
        evaluation_time += time.perf_counter() - start
        about = REFERENCE_ABOUT.get(name) or get_method("generation", name).about
        return {"metrics": {"after": metrics}, "about": about, "evidence": None}

    writer = OutputWriter(out, scenario.name, loaded.weights_sha256)

    results: dict[str, dict[str, Any]] = {"original": {**evaluate(original, "original"), "wall_time_s": None}}
    original_metrics = results["original"]["metrics"]["after"]

    retrain_time = None
    if scenario.retrain is not None:
        entry = EMBEDDED_DIFFUSION.get(scenario.model.name)
        steps = scenario.retrain.steps or (entry.recipe.steps if entry else None)
        if steps is None:
            raise SafeEditError("retrain needs a step count for a non-embedded model: set retrain.steps")
        seed = scenario.seed + scenario.retrain.seed_offset
        recipe = replace(entry.recipe if entry else DiffusionRecipe(), steps=steps, seed=seed)
        say(f"retraining from scratch without class {forget_class} ({steps} steps; the reference)", progress)
        start = time.perf_counter()
        reference = train_from_scratch(original, retain[0], retain[1], recipe, progress)
        retrain_time = time.perf_counter() - start
        results["retrain"] = {**evaluate(reference, "retrain"), "wall_time_s": retrain_time, "seed": seed}
        writer.save("retrain", reference.unet.state_dict(), None)

    for index, (name, method_options) in enumerate(options.items(), 1):
        spec = get_method("generation", name)
        say(f"method {index}/{len(options)}: {name} ({spec.summary})", progress)
        start = time.perf_counter()
        output = spec.run(GenerationTask(original, forget, retain), method_options, scenario.seed, progress)
        edited, mask = output.model, output.mask
        wall = time.perf_counter() - start
        result = evaluate(edited, name)
        if retrain_time:
            result["metrics"]["after"]["time_vs_retrain"] = wall / retrain_time
        result["metrics"]["before"] = original_metrics
        results[name] = {**result, "wall_time_s": wall, "seed": scenario.seed, "options": method_options.model_dump(),
                         "mask": writer.save(name, edited.unet.state_dict(), mask),
                         "weight_changes": weight_changes(original.unet, edited.unet, mask)}

    grid = sample_grid(samples, original.num_classes, out / "samples.png", forget_class=forget_class)
    writer.add(grid, "sample grid")
    notes = [f"Samples are judged by {scenario.judge.name}, which classifies {judge_test_accuracy:.1%} of the real "
             "test images correctly; its errors on generated images count as the generator's."]
    if judge_test_accuracy < 0.9:
        notes.append("The judge is below 90% accuracy on real images: its verdicts on samples are weak evidence.")
    record_path = out / "record.json"
    write_record({
        **common_record(scenario, path, out, device),
        "kind": "generation-unlearning",
        "inputs": input_entries(path, {"model weights": loaded.files, "judge weights": judge_loaded.files}),
        "outputs": writer.entries,
        "data": data_fingerprints(split, test),
        "model": {"source": scenario.model.name, "origin": loaded.origin, "weights_sha256": loaded.weights_sha256,
                  "judge": scenario.judge.name, "judge_origin": judge_loaded.origin,
                  "judge_weights_sha256": judge_loaded.weights_sha256,
                  "judge_test_accuracy": judge_test_accuracy},
        "timings": run_timings(started, evaluation_time, retrain_time),
        "notes": notes,
        "results": results,
        "verdict": verdict(scenario.criteria, results),
    }, record_path)
    return record_path
