"""The metric sets of the two LLM unlearning protocols, from the primitives in `safeedit.eval.language`.

- Fictitious authors (TOFU): forget quality (KS p-value of the forget truth ratios against the retrained reference),
  truth ratio on the forget set, ROUGE-L recall of greedy answers on forget and retain, model utility (harmonic
  mean of retain answer probability, retain truth ratio and retain ROUGE-L) and the Min-k% membership AUC of the
  forget answers against answers about authors never trained on.
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
    answer_logprobs,
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


@dataclass
class AuthorsEvaluation:
    metrics: dict[str, float]
    forget_ratios: np.ndarray  # per forget question: what forget quality compares with the reference's
    answers: dict[str, list[str]] = field(default_factory=dict)


def _ratios(model: nn.Module, tokenizer: Any, items: Sequence[QAItem], batch_size: int) -> np.ndarray:
    return truth_ratios(model, tokenizer, [q.question for q in items], [q.paraphrased for q in items],
                        [list(q.perturbed) for q in items], batch_size)


def _gold_logprobs(model: nn.Module, tokenizer: Any, items: Sequence[QAItem], batch_size: int) -> list:
    return answer_logprobs(model, tokenizer, [q.question for q in items], [q.answer for q in items], batch_size)


def authors_metrics(model: nn.Module, tokenizer: Any, forget: Sequence[QAItem], retain: Sequence[QAItem],
                    holdout: Sequence[QAItem], reference_ratios: np.ndarray | None, max_new_tokens: int = 48,
                    batch_size: int = 16, min_k: float = 0.2) -> AuthorsEvaluation:
    """TOFU's metrics of `model`; `reference_ratios` are the retrained model's forget truth ratios (None: the
    model is the reference itself, and forget quality is left out)."""
    forget_ratios = _ratios(model, tokenizer, forget, batch_size)
    retain_ratios = _ratios(model, tokenizer, retain, batch_size)
    forget_logprobs = _gold_logprobs(model, tokenizer, forget, batch_size)
    retain_logprobs = _gold_logprobs(model, tokenizer, retain, batch_size)
    holdout_logprobs = _gold_logprobs(model, tokenizer, holdout, batch_size)
    answers = {part: generate_answers(model, tokenizer, [q.question for q in items], max_new_tokens, batch_size)
               for part, items in (("forget", forget), ("retain", retain))}
    rouge_forget = float(np.mean(rouge_l_recall(answers["forget"], [q.answer for q in forget])))
    rouge_retain = float(np.mean(rouge_l_recall(answers["retain"], [q.answer for q in retain])))
    probability_retain = float(np.mean([normalized_probability(lp) for lp in retain_logprobs]))
    metrics = {
        "truth_ratio_forget": forget_truth_ratio(forget_ratios),
        "rouge_l_forget": rouge_forget,
        "rouge_l_retain": rouge_retain,
        "probability_forget": float(np.mean([normalized_probability(lp) for lp in forget_logprobs])),
        "probability_retain": probability_retain,
        "truth_ratio_retain": retain_truth_ratio(retain_ratios),
        "model_utility": model_utility([probability_retain, retain_truth_ratio(retain_ratios), rouge_retain]),
        "mia_auc": min_k_auc(min_k_scores(forget_logprobs, min_k), min_k_scores(holdout_logprobs, min_k)),
    }
    if reference_ratios is not None:
        metrics = {"forget_quality": forget_quality(forget_ratios, reference_ratios), **metrics}
    return AuthorsEvaluation(metrics, forget_ratios, answers)


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
