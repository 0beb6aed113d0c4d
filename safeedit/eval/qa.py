"""The metric sets of the LLM unlearning protocols, from the primitives in `safeedit.eval.language`.

- Question-answer sets (fictitious authors, and a user's own files; TOFU's definitions as in TOFU's and
  open-unlearning's code, see `safeedit.eval.language`): answer probability and ROUGE-L recall of greedy answers on
  forget and retain; with perturbed answers, the truth ratio (forget: mean min(R, 1/R), R with the geometric mean
  over the perturbed answers; retain: mean max(0, 1 - R)) and, against a reference model's forget truth ratios,
  forget quality (KS p-value); model utility (harmonic mean of the parts measured, named by `utility_parts`: at most
  the three retain values of TOFU's nine, since no real-authors or world-facts questions are available offline);
  with held-out questions, the Min-k% membership AUC (k = 0.4) of the forget answers against answers never trained
  on; and, for a user's files, the perplexity of the retain answers.
- Real knowledge (capitals): forget and retain accuracy of greedy answers and perplexity on held-out text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from safeedit.data.authors import QAItem
from safeedit.data.capitals import answer_mentions
from safeedit.errors import SafeEditError
from safeedit.eval.language import (
    MIN_K,
    answer_logprobs,
    answer_perplexity,
    final_token_is_eos,
    forget_quality,
    forget_truth_ratio,
    min_k_auc,
    min_k_scores,
    model_utility,
    normalized_probability,
    perplexity,
    retain_truth_ratio,
    rouge_l_recall,
    truth_ratios,
)
from safeedit.eval.safety import generate_answers

# TOFU's model utility is the harmonic mean of nine values (aggregate_eval_stat.py, `get_model_utility`; open-unlearning
# configs/eval/tofu_metrics/model_utility.yaml): answer probability, ROUGE-L recall and truth ratio on the retain,
# real-authors and world-facts questions. Offline there are only the retain questions: these three metrics.
MODEL_UTILITY_PARTS = ("probability_retain", "truth_ratio_retain", "rouge_l_retain")
TOFU_MODEL_UTILITY_PARTS = tuple(f"{metric}_{part}" for part in ("retain", "real_authors", "world_facts")
                                 for metric in ("probability", "truth_ratio", "rouge_l"))


def utility_parts(retain_truth_ratio: bool = True) -> tuple[str, ...]:
    """The model-utility parts measured: `MODEL_UTILITY_PARTS`, less the retain truth ratio when the retain
    questions have no perturbed answers."""
    return tuple(p for p in MODEL_UTILITY_PARTS if retain_truth_ratio or p != "truth_ratio_retain")


def metric_definitions(min_k: float = MIN_K, parts: Sequence[str] = MODEL_UTILITY_PARTS) -> dict[str, Any]:
    """What the question-answer metrics were computed with, for the record (the metrics dict holds numbers only):
    the model-utility parts by metric name, k of Min-k%, and the truth-ratio and Min-k% conventions."""
    return {
        "model_utility_parts": list(parts),
        "model_utility_missing_parts": [p for p in TOFU_MODEL_UTILITY_PARTS if p not in parts],
        "min_k": min_k,
        "truth_ratio": "geometric mean over perturbed answers (TOFU, open-unlearning)",
        "min_k_tokens": "max(1, int(k * n)), a final end-of-sequence token not scored (open-unlearning)",
    }


def metric_note(min_k: float = MIN_K, parts: Sequence[str] = MODEL_UTILITY_PARTS) -> str:
    """`metric_definitions` as one sentence for a record's notes."""
    missing = "no real-authors or world-facts questions are available offline"
    if "truth_ratio_retain" not in parts:
        missing += ", and the retain questions have no perturbed answers for a truth ratio"
    return (f"Metric definitions follow TOFU's and open-unlearning's code: the truth ratio takes the geometric mean "
            f"over the perturbed answers; model utility is the harmonic mean of {', '.join(parts)} "
            f"({len(parts)} of TOFU's 9 values: {missing}); mia_auc is "
            f"Min-k% Prob with k = {min_k:g}, over the lowest max(1, int(k * n)) answer-token log-probs, a final "
            "end-of-sequence token not scored.")


@dataclass(frozen=True)
class QASets:
    """The questions one evaluation reads: forget, the (evaluated) retain questions, and optionally held-out
    questions the model never saw (the membership attack's non-members). Truth ratios are measured for a set
    whose questions all have perturbed answers; `retain_perplexity` adds the perplexity of the retain answers."""

    forget: Sequence[QAItem]
    retain: Sequence[QAItem]
    holdout: Sequence[QAItem] | None = None
    retain_perplexity: bool = False


@dataclass
class QAEvaluation:
    metrics: dict[str, float]
    forget_ratios: np.ndarray | None  # per forget question: what forget quality compares with the reference's
    answers: dict[str, list[str]] = field(default_factory=dict)
    definitions: dict[str, Any] = field(default_factory=metric_definitions)  # `metric_definitions(min_k, parts)`


def _with_perturbed(items: Sequence[QAItem], name: str) -> bool:
    """Whether every item has perturbed answers (a truth ratio is measured); refuses a set where only some do."""
    given = [bool(q.perturbed) for q in items]
    if any(given) and not all(given):
        raise SafeEditError(f"only {sum(given)} of {len(given)} {name} questions have perturbed answers; give them "
                            "for every question (truth ratio) or for none")
    return all(given)


def _ratios(model: nn.Module, tokenizer: Any, items: Sequence[QAItem], batch_size: int) -> np.ndarray:
    return truth_ratios(model, tokenizer, [q.question for q in items], [q.paraphrased for q in items],
                        [list(q.perturbed) for q in items], batch_size)


def _gold_logprobs(model: nn.Module, tokenizer: Any, items: Sequence[QAItem], batch_size: int) -> list:
    return answer_logprobs(model, tokenizer, [q.question for q in items], [q.answer for q in items], batch_size)


def min_k_answer_scores(tokenizer: Any, items: Sequence[QAItem], logprobs: list, k: float = MIN_K) -> np.ndarray:
    """Min-k% scores of the gold answers from their `answer_logprobs`, a final end-of-sequence token left out as
    open-unlearning does (`final_token_is_eos`)."""
    drop = final_token_is_eos(tokenizer, [q.question for q in items], [q.answer for q in items])
    return min_k_scores(logprobs, k, drop)


def qa_metrics(model: nn.Module, tokenizer: Any, sets: QASets, reference_ratios: np.ndarray | None,
               max_new_tokens: int = 48, batch_size: int = 16, min_k: float = MIN_K) -> QAEvaluation:
    """The metrics of `model` on question-answer sets that need no generated protocol: answer probability and
    ROUGE-L (forget, retain), truth ratios where the questions have perturbed answers, forget quality against
    `reference_ratios` (the reference model's forget truth ratios; None: no reference, or the model is the
    reference), model utility from the parts measured, the membership AUC where held-out questions are given, and
    the retain answers' perplexity if asked. `definitions` of the result names the model-utility parts and k."""
    forget, retain = sets.forget, sets.retain
    forget_tr, retain_tr = _with_perturbed(forget, "forget"), _with_perturbed(retain, "retain")
    forget_ratios = _ratios(model, tokenizer, forget, batch_size) if forget_tr else None
    retain_ratios = _ratios(model, tokenizer, retain, batch_size) if retain_tr else None
    forget_logprobs = _gold_logprobs(model, tokenizer, forget, batch_size)
    retain_logprobs = _gold_logprobs(model, tokenizer, retain, batch_size)
    answers = {part: generate_answers(model, tokenizer, [q.question for q in items], max_new_tokens, batch_size)
               for part, items in (("forget", forget), ("retain", retain))}
    metrics = {
        **({"truth_ratio_forget": forget_truth_ratio(forget_ratios)} if forget_ratios is not None else {}),
        "rouge_l_forget": float(np.mean(rouge_l_recall(answers["forget"], [q.answer for q in forget]))),
        "rouge_l_retain": float(np.mean(rouge_l_recall(answers["retain"], [q.answer for q in retain]))),
        "probability_forget": float(np.mean([normalized_probability(lp) for lp in forget_logprobs])),
        "probability_retain": float(np.mean([normalized_probability(lp) for lp in retain_logprobs])),
        **({"truth_ratio_retain": retain_truth_ratio(retain_ratios)} if retain_ratios is not None else {}),
    }
    parts = utility_parts(retain_ratios is not None)
    metrics["model_utility"] = model_utility([metrics[part] for part in parts])
    if sets.holdout:
        holdout_logprobs = _gold_logprobs(model, tokenizer, sets.holdout, batch_size)
        metrics["mia_auc"] = min_k_auc(min_k_answer_scores(tokenizer, forget, forget_logprobs, min_k),
                                       min_k_answer_scores(tokenizer, sets.holdout, holdout_logprobs, min_k))
    if sets.retain_perplexity:
        metrics["perplexity"] = answer_perplexity(retain_logprobs)
    if reference_ratios is not None and forget_ratios is not None:
        metrics = {"forget_quality": forget_quality(forget_ratios, reference_ratios), **metrics}
    return QAEvaluation(metrics, forget_ratios, answers, metric_definitions(min_k, parts))


def authors_metrics(model: nn.Module, tokenizer: Any, forget: Sequence[QAItem], retain: Sequence[QAItem],
                    holdout: Sequence[QAItem], reference_ratios: np.ndarray | None, max_new_tokens: int = 48,
                    batch_size: int = 16, min_k: float = MIN_K) -> QAEvaluation:
    """TOFU's metrics of `model` on fictitious authors (every question has perturbed answers, and authors never
    trained on are held out): `qa_metrics`; `reference_ratios` are the retrained model's forget truth ratios (None:
    the model is the reference itself, and forget quality is left out)."""
    return qa_metrics(model, tokenizer, QASets(forget, retain, holdout), reference_ratios, max_new_tokens,
                      batch_size, min_k)


def knowledge_accuracy(answers: Sequence[str], facts: Sequence[Any]) -> float:
    """Share of greedy answers that name the fact's capital."""
    return sum(answer_mentions(a, f.capital) for a, f in zip(answers, facts, strict=True)) / len(facts)


def capitals_metrics(model: nn.Module, tokenizer: Any, forget: Sequence[Any], retain: Sequence[Any],
                     fluency_texts: Sequence[str], max_new_tokens: int = 24,
                     batch_size: int = 16) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Forget and retain accuracy of greedy answers, and perplexity on held-out text (plus the answers)."""
    answers = {part: generate_answers(model, tokenizer, [f.qa().question for f in facts], max_new_tokens,
                                      batch_size)
               for part, facts in (("forget", forget), ("retain", retain))}
    metrics = {"forget_accuracy": knowledge_accuracy(answers["forget"], forget),
               "retain_accuracy": knowledge_accuracy(answers["retain"], retain),
               "perplexity": perplexity(model, tokenizer, fluency_texts)}
    return metrics, answers
