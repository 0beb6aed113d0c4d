"""The LLM unlearning job: build the setting (fictitious authors or known capitals), run each `<objective>[+<mask>]`
method (registered, kind `llm-unlearning`) on the same model, evaluate with the protocol's metrics, write masks,
weights and the record (the loop itself is `safeedit.runners.job`).

Fictitious authors: the model to unlearn is the base model fine-tuned on every trained author, the reference the
same fine-tune on the retain authors only; both are cached (they are the setting, not the method) and recorded as
inputs with their hashes. Capitals: the base model is the model to unlearn; only the capitals it answers correctly
are used, and there is no retrained reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from safeedit.data.authors import fictitious_authors, qa_fingerprint, retain_subset
from safeedit.data.capitals import CAPITAL_ANSWER_TOKENS, capital_facts, capitals_setting, known_capitals
from safeedit.eval.qa import authors_metrics, capitals_metrics, metric_note
from safeedit.eval.weights import weight_changes
from safeedit.io import sha256_file
from safeedit.methods import EditResult, MethodSpec, resolve
from safeedit.models.cache import cached_finetune
from safeedit.progress import say
from safeedit.runners.common import input_entries
from safeedit.runners.job import Job
from safeedit.scenario import AuthorsSection, CapitalsSection, LMScenario
from safeedit.unlearn.wagle import KIND, LMUnlearnSetting, about


class LanguageJob(Job):
    """LLM unlearning: the model to unlearn (and, for fictitious authors, the retrain reference) is the setting;
    each method is an objective, optionally confined to the mask its name gives (`npo+wagle`)."""

    kind = KIND
    scenario: LMScenario

    def prepare(self) -> None:
        scenario = self.scenario
        base = self.load_language_model()
        self.inputs: dict[str, dict[str, str]] = {"model weights": self.loaded.files}
        self.notes: list[str] = []
        self.reference_ratios: np.ndarray | None = None
        if isinstance(scenario.data, AuthorsSection):
            source_sha = self.prepare_authors(base, scenario.data)
        else:
            source_sha = self.prepare_capitals(base, scenario.data)
        self.examples_per_epoch = len(self.forget_chats)  # an epoch passes over the forget set
        self.original_metrics = self.measure(self.original, "the original model")
        self.results["original"] = {"metrics": {"after": self.original_metrics}, "wall_time_s": None,
                                    "about": self.references["original"]}
        self.writer = self.output_writer(source_sha)

    def prepare_authors(self, base: nn.Module, section: AuthorsSection) -> str:
        """The fine-tune on every author (the model to unlearn) and on the retain authors (the reference, evaluated
        here); returns the SHA-256 of the model to unlearn."""
        scenario, loaded, progress = self.scenario, self.loaded, self.progress
        data = fictitious_authors(section.authors, section.questions_per_author, section.holdout_authors,
                                  section.forget_ratio, section.perturbed, section.seed, section.split_seed)
        self.authors = data
        self.eval_retain = retain_subset(data.retain, scenario.evaluation.retain_questions, scenario.seed)
        self.original, original_path = cached_finetune(
            base, self.tokenizer, [q.chat() for q in data.train()], scenario.finetune, scenario.seed,
            "authors-all", loaded.weights_sha256, progress)
        source_sha = sha256_file(original_path)
        self.inputs["model to unlearn (fine-tuned on all authors, cached)"] = {str(original_path): source_sha}
        if scenario.retrain:
            reference, reference_path = cached_finetune(
                base, self.tokenizer, [q.chat() for q in data.retain], scenario.finetune, scenario.seed,
                "authors-retain", loaded.weights_sha256, progress)
            self.inputs["reference (fine-tuned on the retain authors only, cached)"] = {
                str(reference_path): sha256_file(reference_path)}
            retrained = self.authors_evaluation(reference, "retrain", None)
            self.reference_ratios = retrained.forget_ratios
            self.results["retrain"] = {"metrics": {"after": retrained.metrics}, "wall_time_s": None,
                                       "about": self.references["retrain"]}
        self.forget_chats, self.retain_chats = [q.chat() for q in data.forget], [q.chat() for q in data.retain]
        self.data_fingerprints = data.fingerprints()
        self.notes.append(metric_note(scenario.evaluation.min_k))
        self.notes.append(
            f"{len(data.forget_authors)} of {section.authors} fictitious authors are forgotten ({len(data.forget)} "
            f"questions); retain metrics read {len(self.eval_retain)} of {len(data.retain)} retain questions; the "
            f"membership attack compares the forget answers with answers about {section.holdout_authors} authors the "
            "model never saw.")
        return source_sha

    def prepare_capitals(self, base: nn.Module, section: CapitalsSection) -> str:
        """The capitals the base model (the model to unlearn) knows, split into forget and retain; returns the
        SHA-256 of the base weights."""
        evaluation = self.scenario.evaluation
        self.original, self.authors = base, None
        facts = capital_facts()
        known = known_capitals(base, self.tokenizer, facts, CAPITAL_ANSWER_TOKENS, evaluation.batch_size)
        self.capitals = capitals = capitals_setting(known, section, evaluation.retain_questions, self.scenario.seed)
        self.forget_chats = [f.qa().chat() for f in capitals.forget]
        self.retain_chats = [f.qa().chat() for f in capitals.retain]
        self.data_fingerprints = {"forget": qa_fingerprint([f.qa() for f in capitals.forget]),
                                  "retain": qa_fingerprint([f.qa() for f in capitals.retain])}
        self.notes.append(
            f"The base model answers {len(known)} of {len(facts)} capital questions correctly; "
            f"{len(capitals.forget)} of those are forgotten ({', '.join(f.country for f in capitals.forget)}) and "
            f"{len(capitals.evaluated_retain)} of the other {len(capitals.retain)} are checked as retained. "
            f"Perplexity is measured on {len(capitals.fluency)} Wikipedia summaries that mention no forgotten country "
            "or capital. No retrained reference exists for knowledge learned in pre-training.")
        return self.loaded.weights_sha256

    def authors_evaluation(self, model: nn.Module, name: str, reference_ratios: np.ndarray | None):
        evaluation = self.scenario.evaluation
        with self.timed_evaluation():
            say(f"evaluating {name}", self.progress)
            return authors_metrics(model, self.tokenizer, self.authors.forget, self.eval_retain, self.authors.holdout,
                                   reference_ratios, evaluation.max_new_tokens, evaluation.batch_size,
                                   evaluation.min_k)

    def measure(self, model: nn.Module, name: str) -> dict[str, float]:
        """The protocol's metrics of `model` (fictitious authors: forget quality against the reference's)."""
        if self.authors is not None:
            return self.authors_evaluation(model, name, self.reference_ratios).metrics
        capitals, evaluation = self.capitals, self.scenario.evaluation
        with self.timed_evaluation():
            say(f"evaluating {name}", self.progress)
            return capitals_metrics(model, self.tokenizer, capitals.forget, capitals.evaluated_retain,
                                    capitals.fluency, CAPITAL_ANSWER_TOKENS, evaluation.batch_size)[0]

    def setting_for(self, name: str) -> LMUnlearnSetting:
        """The setting of method `name`: its mask score is part of its name (`npo+wagle`)."""
        return LMUnlearnSetting(self.original, self.tokenizer, self.forget_chats, self.retain_chats,
                                resolve(KIND, name).mask_score)

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        return {"metrics": {"before": self.original_metrics, "after": self.measure(result.model, name)},
                "weight_changes": weight_changes(self.original, result.model, result.mask)}

    def save(self, name: str, result: EditResult) -> dict[str, Any]:
        """The weights of the methods `save_weights` names (default: the first); the mask of every masked method."""
        if name in self.scenario.weights_to_save():
            return {"mask": self.writer.save_model(name, result.model, result.mask)}
        return {"mask": self.writer.save_mask(name, result.mask) if result.mask is not None else None}

    def about(self, name: str, spec: MethodSpec) -> dict[str, str]:
        return about(resolve(KIND, name))

    def record_fields(self, started: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "inputs": input_entries(self.path, self.inputs),
            "data": self.data_fingerprints,
            "model": {"source": self.scenario.model.name, "weights_sha256": self.loaded.weights_sha256},
            "timings": self.timings(started),
            "notes": self.notes,
        }
