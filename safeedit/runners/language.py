"""The LLM unlearning job: build the setting (fictitious authors, known capitals or the user's own question files),
run each `<objective>[+<mask>]` method (registered, kind `llm-unlearning`) on the same model, evaluate with the
protocol's metrics, write masks, weights and the record (the loop itself is `safeedit.runners.job`).

Fictitious authors: the model to unlearn is the base model fine-tuned on every trained author, the reference the
same fine-tune on the retain authors only; both are cached (they are the setting, not the method) and recorded as
inputs with their hashes. Capitals: the base model is the model to unlearn; only the capitals it answers correctly
are used, and there is no retrained reference. Own files: the model is unlearned as it is; the files (read and
checked when the scenario was loaded) and the optional reference folder are recorded as inputs with their hashes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from safeedit.data.authors import fictitious_authors, qa_fingerprint, retain_subset
from safeedit.data.capitals import CAPITAL_ANSWER_TOKENS, capital_facts, capitals_setting, known_capitals
from safeedit.data.qa_files import QAFiles
from safeedit.errors import SafeEditError
from safeedit.eval.qa import QAEvaluation, QASets, capitals_metrics, metric_note, qa_metrics, utility_parts
from safeedit.eval.weights import weight_changes
from safeedit.io import sha256_file
from safeedit.methods import EditResult, MethodSpec, resolve
from safeedit.models.cache import cached_finetune
from safeedit.progress import say
from safeedit.robustness import AttackSurface
from safeedit.robustness.language import LanguageData, language_surface
from safeedit.runners.common import input_entries
from safeedit.runners.job import Job
from safeedit.runners.references import GIVEN_REFERENCE
from safeedit.scenario import AuthorsSection, CapitalsSection, LMScenario, QAFilesSection
from safeedit.unlearn.wagle import KIND, LMUnlearnSetting, about


class LanguageJob(Job):
    """LLM unlearning: the model to unlearn and its reference (fictitious authors: the retain-only fine-tune; own
    files: the user's `reference.model`, if given) are the setting; each method is an objective, optionally confined
    to the mask its name gives (`npo+wagle`)."""

    kind = KIND
    scenario: LMScenario

    @classmethod
    def check_sharded(cls, scenario: LMScenario) -> None:
        """Sharded runs edit the user's own model (files or capitals); the battery copies models FSDP2 cannot."""
        if isinstance(scenario.data, AuthorsSection):
            raise SafeEditError("the fictitious-authors setting fine-tunes its own models first and runs in one "
                                "process; run your own files (data: forget/retain) sharded, or drop torchrun")
        if scenario.robustness is not None:
            raise SafeEditError("the robustness battery (robustness:) runs in one process; remove it to run "
                                "sharded, or drop torchrun / accelerate launch")

    def prepare(self) -> None:
        scenario = self.scenario
        base = self.load_language_model()
        self.inputs: dict[str, dict[str, str]] = {"model weights": self.loaded.files}
        self.notes: list[str] = []
        self.reference_ratios: np.ndarray | None = None
        self.qa: QASets | None = None  # the question sets of fictitious authors and own files (capitals: None)
        if isinstance(scenario.data, AuthorsSection):
            source_sha = self.prepare_authors(base, scenario.data)
        elif isinstance(scenario.data, QAFilesSection):
            source_sha = self.prepare_files(base)
        else:
            source_sha = self.prepare_capitals(base, scenario.data)
        self.examples_per_epoch = len(self.forget_chats)  # an epoch passes over the forget set
        if self.sharded:
            import torch.distributed as dist

            self.notes.append(f"Run by {dist.get_world_size()} processes ({dist.get_backend()}), the model sharded "
                              "by FSDP2; every process ran every step on the same data, so the results are those "
                              "of one process, to float tolerance.")
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
        eval_retain = retain_subset(data.retain, scenario.evaluation.retain_questions, scenario.seed)
        self.qa = QASets(data.forget, eval_retain, data.holdout)
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
            retrained = self.qa_evaluation(reference, "retrain", None)
            self.reference_ratios = retrained.forget_ratios
            self.keep_reference(reference)
            self.results["retrain"] = {"metrics": {"after": retrained.metrics}, "wall_time_s": None,
                                       "about": self.references["retrain"]}
        self.forget_chats, self.retain_chats = [q.chat() for q in data.forget], [q.chat() for q in data.retain]
        self.attack_data = LanguageData.authors(data.forget, data.retain, eval_retain)
        self.data_fingerprints = data.fingerprints()
        self.notes.append(metric_note(scenario.evaluation.min_k))
        self.notes.append(
            f"{len(data.forget_authors)} of {section.authors} fictitious authors are forgotten ({len(data.forget)} "
            f"questions); retain metrics read {len(eval_retain)} of {len(data.retain)} retain questions; the "
            f"membership attack compares the forget answers with answers about {section.holdout_authors} authors the "
            "model never saw.")
        return source_sha

    def prepare_files(self, base: nn.Module) -> str:
        """The user's files (read when the scenario was loaded) and, when given, the reference model, evaluated here
        and then freed (kept when the robustness battery attacks it); returns the SHA-256 of the model's weights."""
        scenario, evaluation = self.scenario, self.scenario.evaluation
        files = scenario.qa_files()
        self.original = base
        self.inputs.update(files.inputs())
        retain = retain_subset(files.retain.items, evaluation.retain_questions, scenario.seed)
        self.qa = QASets(files.forget.items, retain, files.holdout.items if files.holdout else None,
                         retain_perplexity=True)
        self.forget_chats, self.retain_chats = files.forget.chats(), files.retain.chats()
        self.attack_data = LanguageData.files(files.forget.items, files.retain.items, retain)
        self.data_fingerprints = files.fingerprints()
        if scenario.reference is not None:
            self.results["retrain"] = self.given_reference(scenario.reference.model)
        parts = utility_parts(files.retain.has_perturbed())
        self.notes.append(metric_note(evaluation.min_k, parts))
        self.notes.append(files_note(files, len(retain), scenario.reference is not None))
        return self.loaded.weights_sha256

    def given_reference(self, folder: str) -> dict[str, Any]:
        """The reference row from the user's model trained without the forget data; keeps its forget truth ratios
        for forget quality."""
        from safeedit.models.language import load_language_model
        from safeedit.models.state import check_same_architecture

        say(f"loading the reference {folder}", self.progress)
        loaded = load_language_model(folder, self.scenario.model.trust_remote_code, self.progress,
                                     self.scenario.model.dtype)
        check_same_architecture(self.original, loaded.model, f"reference.model {folder}")  # (DTensors: whole shapes)
        self.inputs["reference model (reference.model)"] = loaded.files
        evaluated = self.qa_evaluation(self.placed(loaded.model), "the reference", None)
        self.reference_ratios = evaluated.forget_ratios
        self.keep_reference(loaded.model)
        return {"metrics": {"after": evaluated.metrics}, "wall_time_s": None, "about": GIVEN_REFERENCE}

    def prepare_capitals(self, base: nn.Module, section: CapitalsSection) -> str:
        """The capitals the base model (the model to unlearn) knows, split into forget and retain; returns the
        SHA-256 of the base weights."""
        evaluation = self.scenario.evaluation
        self.original = base
        facts = capital_facts()
        known = known_capitals(base, self.tokenizer, facts, CAPITAL_ANSWER_TOKENS, evaluation.batch_size)
        self.capitals = capitals = capitals_setting(known, section, evaluation.retain_questions, self.scenario.seed)
        self.forget_chats = [f.qa().chat() for f in capitals.forget]
        self.retain_chats = [f.qa().chat() for f in capitals.retain]
        self.attack_data = LanguageData.capitals(capitals.forget, capitals.retain, capitals.evaluated_retain)
        self.data_fingerprints = {"forget": qa_fingerprint([f.qa() for f in capitals.forget]),
                                  "retain": qa_fingerprint([f.qa() for f in capitals.retain])}
        self.notes.append(
            f"The base model answers {len(known)} of {len(facts)} capital questions correctly; "
            f"{len(capitals.forget)} of those are forgotten ({', '.join(f.country for f in capitals.forget)}) and "
            f"{len(capitals.evaluated_retain)} of the other {len(capitals.retain)} are checked as retained. "
            f"Perplexity is measured on {len(capitals.fluency)} Wikipedia summaries that mention no forgotten country "
            "or capital. No retrained reference exists for knowledge learned in pre-training.")
        return self.loaded.weights_sha256

    def keep_reference(self, model: nn.Module) -> None:
        """Keep the reference model when the robustness battery attacks it (or measures forget quality with it)."""
        if self.scenario.robustness is not None:
            self.reference_model = model

    def reference_models(self) -> dict[str, Any]:
        reference = getattr(self, "reference_model", None)
        return {"original": self.original, **({"retrain": reference} if reference is not None else {})}

    def attack_surface(self) -> AttackSurface:
        scenario = self.scenario
        tokens = CAPITAL_ANSWER_TOKENS if self.qa is None else scenario.evaluation.max_new_tokens
        return language_surface(self.attack_data, self.tokenizer, scenario.robustness, scenario.seed, tokens,
                                scenario.evaluation.batch_size, scenario.unlearning.max_length,
                                getattr(self, "reference_model", None))

    def qa_evaluation(self, model: nn.Module, name: str, reference_ratios: np.ndarray | None) -> QAEvaluation:
        evaluation = self.scenario.evaluation
        with self.timed_evaluation():
            say(f"evaluating {name}", self.progress)
            return qa_metrics(model, self.tokenizer, self.qa, reference_ratios, evaluation.max_new_tokens,
                              evaluation.batch_size, evaluation.min_k)

    def measure(self, model: nn.Module, name: str) -> dict[str, float]:
        """The protocol's metrics of `model` (forget quality against the reference's truth ratios, where there is
        a reference)."""
        if self.qa is not None:
            return self.qa_evaluation(model, name, self.reference_ratios).metrics
        capitals, evaluation = self.capitals, self.scenario.evaluation
        with self.timed_evaluation():
            say(f"evaluating {name}", self.progress)
            return capitals_metrics(model, self.tokenizer, capitals.forget, capitals.evaluated_retain,
                                    capitals.fluency, CAPITAL_ANSWER_TOKENS, evaluation.batch_size)[0]

    def setting_for(self, name: str) -> LMUnlearnSetting:
        """The setting of method `name`: its mask score is part of its name (`npo+wagle`). Sharded, the method edits
        a fresh sharded copy in place (FSDP2 models cannot be deep-copied) and reads the original as its reference."""
        target = None
        if self.sharded:
            from safeedit.models.fsdp import sharded_copy

            target = sharded_copy(self.original)
        return LMUnlearnSetting(self.original, self.tokenizer, self.forget_chats, self.retain_chats,
                                resolve(KIND, name).mask_score, target=target)

    def evaluate(self, name: str, result: EditResult, wall_s: float) -> dict[str, Any]:
        return {"metrics": {"before": self.original_metrics, "after": self.measure(result.model, name)},
                "weight_changes": weight_changes(self.original, result.model, result.mask)}

    def save(self, name: str, result: EditResult) -> dict[str, Any]:
        """The weights of the methods `save_weights` names (default: the first); the mask of every masked method.
        Sharded, the model and mask are gathered whole on the first process, which writes them (the others, none)."""
        if self.sharded:
            from safeedit.models.fsdp import gathered_model

            whole = gathered_model(result.model) if name in self.scenario.weights_to_save() else None
            mask = result.mask.full_tensor() if result.mask is not None else None
            if not self.writes:
                return {"mask": None}
            result = EditResult(model=whole, masks={"mask": mask} if mask is not None else {})
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


def files_note(files: QAFiles, evaluated_retain: int, reference: bool) -> str:
    """What the record's metrics read of the user's files, and what was not measured for want of which file."""
    retain = len(files.retain.items)
    parts = [f"Your files: {len(files.forget.items)} forget questions ({files.forget.path}) and {retain} retain "
             f"questions ({files.retain.path}); every retain question is used by the objectives' retain term, the "
             f"retain metrics read {evaluated_retain} of them" + (" (a seeded subset)" if evaluated_retain < retain
                                                                  else "") + ".",
             "Perplexity is that of the retain answers given their questions (through the chat template, the end "
             "of turn included)."]
    if files.holdout is not None:
        parts.append(f"The membership attack compares the forget answers with {len(files.holdout.items)} held-out "
                     f"answers ({files.holdout.path}) the model never saw.")
    else:
        parts.append("No held-out questions (data.holdout), so no membership attack (mia_auc).")
    if not files.forget.has_perturbed():
        parts.append("No perturbed answers for the forget questions, so no truth ratio or forget quality.")
    elif not reference:
        parts.append("No reference model (reference.model), so no forget quality.")
    return " ".join(parts)
