"""The LLM unlearning runner: build the setting (fictitious authors or known capitals), run each
`<objective>[+<mask>]` method (registered, kind `llm-unlearning`) on the same model, evaluate with the protocol's
metrics, write masks, weights and the record.

Fictitious authors: the model to unlearn is the base model fine-tuned on every trained author, the reference the
same fine-tune on the retain authors only; both are cached (they are the setting, not the method) and recorded as
inputs with their hashes. Capitals: the base model is the model to unlearn; only the capitals it answers correctly
are used, and there is no retrained reference.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from safeedit.criteria import verdict
from safeedit.data.authors import fictitious_authors, qa_fingerprint
from safeedit.data.capitals import CapitalFact, answer_mentions, capital_facts, wikipedia_passages
from safeedit.errors import SafeEditError
from safeedit.eval.qa import authors_metrics, capitals_metrics
from safeedit.eval.safety import generate_answers
from safeedit.eval.weights import weight_changes
from safeedit.io import sha256_file
from safeedit.methods import resolve
from safeedit.models.language import load_language_model
from safeedit.record import write_record
from safeedit.runners.common import OutputWriter, cached_finetune, common_record, input_entries, say
from safeedit.scenario import AuthorsSection, CapitalsSection, LMScenario
from safeedit.unlearn.wagle import KIND, LMUnlearnSetting, about

Measured = TypeVar("Measured")
REFERENCE_ABOUT = {
    "original": {"summary": "the model before unlearning", "limitations": "Reference only; not a method."},
    "retrain": {"summary": "the base model fine-tuned on the retain authors only: what exact unlearning would give",
                "limitations": "One fine-tune on one seed; the retrain-vs-retrain spread is measured in "
                               "benchmarks/wagle.py."},
}


def retain_subset(items: list[Any], count: int, seed: int) -> list[Any]:
    """A seeded subset of `count` retain items, in their original order (the evaluated retain questions)."""
    if count >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), count))
    return [item for i, item in enumerate(items) if i in keep]


def known_capitals(model: nn.Module, tokenizer: Any, facts: list[CapitalFact], max_new_tokens: int,
                   batch_size: int) -> list[CapitalFact]:
    """The facts whose capital the model names in its greedy answer."""
    answers = generate_answers(model, tokenizer, [f.qa().question for f in facts], max_new_tokens, batch_size)
    return [f for f, a in zip(facts, answers, strict=True) if answer_mentions(a, f.capital)]


@dataclass(frozen=True)
class CapitalsSetting:
    forget: list[CapitalFact]
    retain: list[CapitalFact]
    evaluated_retain: list[CapitalFact]  # the seeded subset of `retain` whose answers are checked
    fluency: list[str]  # held-out Wikipedia summaries naming no forgotten country or capital


def capitals_setting(known: list[CapitalFact], section: CapitalsSection, retain_questions: int,
                     subset_seed: int) -> CapitalsSetting:
    """Split the known capitals into forget (`section.forget`, drawn with `section.seed`) and retain, and pick the
    evaluated retain questions and the perplexity texts."""
    if len(known) <= section.forget:
        raise SafeEditError(f"the model answers only {len(known)} capital question(s) correctly; lower data.forget "
                            f"(now {section.forget}) so that some known capitals are retained")
    chosen = set(random.Random(section.seed).sample(range(len(known)), section.forget))
    forget = [f for i, f in enumerate(known) if i in chosen]
    retain = [f for i, f in enumerate(known) if i not in chosen]
    names = [f.country for f in forget] + [f.capital for f in forget]
    return CapitalsSetting(forget, retain, retain_subset(retain, retain_questions, subset_seed),
                           wikipedia_passages(section.fluency_texts, section.seed, exclude=names))


def run_llm_unlearning(scenario: LMScenario, path: Path, out: Path, device: torch.device, progress: bool) -> Path:
    started = time.perf_counter()
    options = scenario.method_options()
    evaluation = scenario.evaluation
    say(f"scenario {scenario.name}: loading {scenario.model.name}", progress)
    loaded = load_language_model(scenario.model.name, scenario.model.trust_remote_code, progress)
    base, tokenizer = loaded.model.to(device), loaded.tokenizer
    inputs: dict[str, dict[str, str]] = {"model weights": loaded.files}
    model_info: dict[str, Any] = {"source": scenario.model.name, "weights_sha256": loaded.weights_sha256}
    notes: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    evaluation_time = 0.0
    section = scenario.data

    def timed(name: str, measure: Callable[[], Measured]) -> Measured:
        nonlocal evaluation_time
        start = time.perf_counter()
        say(f"evaluating {name}", progress)
        result = measure()
        evaluation_time += time.perf_counter() - start
        return result

    if isinstance(section, AuthorsSection):
        data = fictitious_authors(section.authors, section.questions_per_author, section.holdout_authors,
                                  section.forget_ratio, section.perturbed, section.seed, section.split_seed)
        forget_items, holdout = data.forget, data.holdout
        retain_items = data.retain
        eval_retain = retain_subset(retain_items, evaluation.retain_questions, scenario.seed)
        original, original_path = cached_finetune(
            base, tokenizer, [q.chat() for q in data.train()], scenario.finetune, scenario.seed,
            "authors-all", loaded.weights_sha256, progress)
        source_sha = sha256_file(original_path)
        inputs["model to unlearn (fine-tuned on all authors, cached)"] = {str(original_path): source_sha}

        def authors_evaluation(model: nn.Module, name: str, reference_ratios: np.ndarray | None):
            return timed(name, lambda: authors_metrics(
                model, tokenizer, forget_items, eval_retain, holdout, reference_ratios, evaluation.max_new_tokens,
                evaluation.batch_size, evaluation.min_k))

        reference_ratios = None
        if scenario.retrain:
            reference, reference_path = cached_finetune(
                base, tokenizer, [q.chat() for q in retain_items], scenario.finetune, scenario.seed,
                "authors-retain", loaded.weights_sha256, progress)
            inputs["reference (fine-tuned on the retain authors only, cached)"] = {
                str(reference_path): sha256_file(reference_path)}
            retrained = authors_evaluation(reference, "retrain", None)
            reference_ratios = retrained.forget_ratios
            results["retrain"] = {"metrics": {"after": retrained.metrics}, "wall_time_s": None,
                                  "about": REFERENCE_ABOUT["retrain"]}

        def evaluate(model: nn.Module, name: str) -> dict[str, float]:
            return authors_evaluation(model, name, reference_ratios).metrics
        forget_chats, retain_chats = [q.chat() for q in forget_items], [q.chat() for q in retain_items]
        data_fingerprints = data.fingerprints()
        notes.append(f"{len(data.forget_authors)} of {section.authors} fictitious authors are forgotten "
                     f"({len(forget_items)} questions); retain metrics read {len(eval_retain)} of "
                     f"{len(retain_items)} retain questions; the membership attack compares the forget answers with "
                     f"answers about {section.holdout_authors} authors the model never saw.")
    else:
        original, source_sha = base, loaded.weights_sha256
        facts = capital_facts()
        known = known_capitals(base, tokenizer, facts, 24, evaluation.batch_size)
        setting = capitals_setting(known, section, evaluation.retain_questions, scenario.seed)
        forget_facts, retain_facts, eval_retain, fluency = (setting.forget, setting.retain,
                                                            setting.evaluated_retain, setting.fluency)

        def evaluate(model: nn.Module, name: str) -> dict[str, float]:
            return timed(name, lambda: capitals_metrics(model, tokenizer, forget_facts, eval_retain, fluency, 24,
                                                        evaluation.batch_size)[0])

        forget_chats = [f.qa().chat() for f in forget_facts]
        retain_chats = [f.qa().chat() for f in retain_facts]
        data_fingerprints = {"forget": qa_fingerprint([f.qa() for f in forget_facts]),
                             "retain": qa_fingerprint([f.qa() for f in retain_facts])}
        notes.append(f"The base model answers {len(known)} of {len(facts)} capital questions correctly; "
                     f"{len(forget_facts)} of those are forgotten ({', '.join(f.country for f in forget_facts)}) "
                     f"and {len(eval_retain)} of the other {len(retain_facts)} are checked as retained. Perplexity "
                     f"is measured on {len(fluency)} Wikipedia summaries that mention no forgotten country or "
                     "capital. No retrained reference exists for knowledge learned in pre-training.")

    original_metrics = evaluate(original, "the original model")
    results["original"] = {"metrics": {"after": original_metrics}, "wall_time_s": None,
                           "about": REFERENCE_ABOUT["original"]}
    writer = OutputWriter(out, scenario.name, source_sha)
    for index, (name, method_options) in enumerate(options.items(), 1):
        resolved = resolve(KIND, name)
        say(f"method {index}/{len(options)}: {name} ({method_options.epochs} epochs, lr {method_options.lr:g}"
            + (f", mask ratio {method_options.mask_ratio:g})" if resolved.mask_score else ")"), progress)
        start = time.perf_counter()
        setting = LMUnlearnSetting(original, tokenizer, forget_chats, retain_chats, resolved.mask_score)
        result = resolved.spec.run(setting, method_options, scenario.seed, progress)
        edited, mask = result.model, result.mask
        wall = time.perf_counter() - start
        state = edited.state_dict() if name in scenario.weights_to_save() else None
        mask_summary = (writer.save(name, state, mask) if state is not None
                        else writer.save_mask(name, mask) if mask is not None else None)
        results[name] = {
            "metrics": {"before": original_metrics, "after": evaluate(edited, name)},
            "wall_time_s": wall, "seed": scenario.seed, "options": method_options.model_dump(),
            "about": about(resolved), "mask": mask_summary,
            "weight_changes": weight_changes(original, edited, mask),
        }
        del edited, result

    record_path = out / "record.json"
    write_record({
        **common_record(scenario, path, out, device),
        "kind": "llm-unlearning",
        "inputs": input_entries(path, inputs),
        "outputs": writer.entries,
        "data": data_fingerprints,
        "model": model_info,
        "timings": {"total_s": time.perf_counter() - started, "evaluation_s": evaluation_time},
        "notes": notes,
        "results": results,
        "verdict": verdict(scenario.criteria, results),
    }, record_path)
    return record_path
