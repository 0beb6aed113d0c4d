"""The metric sets of the two LLM unlearning protocols, from the primitives in `safeedit.eval.language`.

- Fictitious authors (TOFU, definitions as in TOFU's and open-unlearning's code; see `safeedit.eval.language`):
  forget quality (KS p-value of the forget truth ratios against the retrained reference's), truth ratio on the
  forget set (mean min(R, 1/R), R with the geometric mean over the perturbed answers), ROUGE-L recall of greedy
  answers on forget and retain, model utility (harmonic mean of the parts in `MODEL_UTILITY_PARTS`: the three
  retain values of TOFU's nine; no real-authors or world-facts questions offline) and the Min-k% membership AUC
  (k = 0.4) of the forget answers against answers about authors never trained on.
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
from safeedit.eval.language import (
    MIN_K,
    answer_logprobs,
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


def metric_definitions(min_k: float = MIN_K) -> dict[str, Any]:
    """What the fictitious-authors metrics were computed with, for the record (the metrics dict holds numbers
    only): the model-utility parts by metric name, k of Min-k%, and the truth-ratio and Min-k% conventions."""
    return {
        "model_utility_parts": list(MODEL_UTILITY_PARTS),
        "model_utility_missing_parts": [p for p in TOFU_MODEL_UTILITY_PARTS if p not in MODEL_UTILITY_PARTS],
        "min_k": min_k,
        "truth_ratio": "geometric mean over perturbed answers (TOFU, open-unlearning)",
        "min_k_tokens": "max(1, int(k * n)), a final end-of-sequence token not scored (open-unlearning)",
    }


def metric_note(min_k: float = MIN_K) -> str:
    """`metric_definitions` as one sentence for a record's notes."""
    return (f"Metric definitions follow TOFU's and open-unlearning's code: the truth ratio takes the geometric mean "
            f"over the perturbed answers; model utility is the harmonic mean of {', '.join(MODEL_UTILITY_PARTS)} "
            f"(3 of TOFU's 9 values: no real-authors or world-facts questions are available offline); mia_auc is "
            f"Min-k% Prob with k = {min_k:g}, over the lowest max(1, int(k * n)) answer-token log-probs, a final "
            "end-of-sequence token not scored.")


@dataclass
class AuthorsEvaluation:
    metrics: dict[str, float]
    forget_ratios: np.ndarray  # per forget question: what forget quality compares with the reference's
    answers: dict[str, list[str]] = field(default_factory=dict)
    definitions: dict[str, Any] = field(default_factory=metric_definitions)  # `metric_definitions(min_k)`


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


def authors_metrics(model: nn.Module, tokenizer: Any, forget: Sequence[QAItem], retain: Sequence[QAItem],
                    holdout: Sequence[QAItem], reference_ratios: np.ndarray | None, max_new_tokens: int = 48,
                    batch_size: int = 16, min_k: float = MIN_K) -> AuthorsEvaluation:
    """TOFU's metrics of `model`; `reference_ratios` are the retrained model's forget truth ratios (None: the
    model is the reference itself, and forget quality is left out). `definitions` of the result names the
    model-utility parts and k."""
    forget_ratios = _ratios(model, tokenizer, forget, batch_size)
    retain_ratios = _ratios(model, tokenizer, retain, batch_size)
    forget_logprobs = _gold_logprobs(model, tokenizer, forget, batch_size)
    retain_logprobs = _gold_logprobs(model, tokenizer, retain, batch_size)
    holdout_logprobs = _gold_logprobs(model, tokenizer, holdout, batch_size)
    answers = {part: generate_answers(model, tokenizer, [q.question for q in items], max_new_tokens, batch_size)
               for part, items in (("forget", forget), ("retain", retain))}
    metrics = {
        "truth_ratio_forget": forget_truth_ratio(forget_ratios),
        "rouge_l_forget": float(np.mean(rouge_l_recall(answers["forget"], [q.answer for q in forget]))),
        "rouge_l_retain": float(np.mean(rouge_l_recall(answers["retain"], [q.answer for q in retain]))),
        "probability_forget": float(np.mean([normalized_probability(lp) for lp in forget_logprobs])),
        "probability_retain": float(np.mean([normalized_probability(lp) for lp in retain_logprobs])),
        "truth_ratio_retain": retain_truth_ratio(retain_ratios),
    }
    metrics["model_utility"] = model_utility([metrics[part] for part in MODEL_UTILITY_PARTS])
    metrics["mia_auc"] = min_k_auc(min_k_answer_scores(tokenizer, forget, forget_logprobs, min_k),
                                   min_k_answer_scores(tokenizer, holdout, holdout_logprobs, min_k))
    if reference_ratios is not None:
        metrics = {"forget_quality": forget_quality(forget_ratios, reference_ratios), **metrics}
    return AuthorsEvaluation(metrics, forget_ratios, answers, metric_definitions(min_k))


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
