"""Language-model unlearning metrics of TOFU / WAGLE (DESIGN.md section 5), following the reference code.

References (the definitions below cite file and function): TOFU, github.com/locuslab/tofu (evaluate_util.py,
aggregate_eval_stat.py), and open-unlearning, github.com/locuslab/open-unlearning (src/evals/metrics/).

- answer log-probabilities: teacher-forced log p of each answer token (and the end of turn) through the chat template;
- truth ratio (per question): R = exp(-mean_j NLL(perturbed_j)) / exp(-NLL(paraphrased)), NLL the per-token mean
  NLL of an answer, i.e. the GEOMETRIC mean over the perturbed answers of their length-normalised probabilities,
  over the paraphrased answer's; forget aggregate mean min(R, 1/R), retain aggregate mean max(0, 1 - R);
- forget quality: p-value of the two-sample KS test between the unlearned and the retrained model's forget-set R;
- ROUGE-L recall of generated answers against the gold answers; model utility: harmonic mean of the retain metrics;
- Min-k% Prob membership inference (Shi et al. 2024) with open-unlearning's conventions (k = 0.4, the lowest
  max(1, int(k * n)) token log-probs, a final end-of-sequence token not scored) and its ROC-AUC; perplexity of
  plain text, and of answers given their questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safeedit.data.chat import IGNORE_INDEX, check_chat_template, pad_batch, tokenize_chat
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError


def _check_nonempty(values: Sequence[Any], what: str) -> None:
    if len(values) == 0:
        raise SafeEditError(f"no {what} given; pass at least one")


def _check_same_length(first: Sequence[Any], second: Sequence[Any], names: tuple[str, str]) -> None:
    if len(first) != len(second):
        raise SafeEditError(f"{len(first)} {names[0]} but {len(second)} {names[1]}; pass one per {names[0][:-1]}")


def _check_batching(batch_size: int, max_length: int) -> None:
    if batch_size < 1 or max_length < 2:
        raise SafeEditError(f"batch_size={batch_size}, max_length={max_length}; use batch_size >= 1, max_length >= 2")


def _token_logprobs(model: nn.Module, rows: Sequence[dict[str, list[int]]], pad_id: int,
                    batch_size: int) -> list[torch.Tensor]:
    """log p(label | previous tokens) at each label that is not IGNORE_INDEX, per row (fp32, CPU).

    Rows are right-padded in batches with an attention mask; the model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(rows[start:start + batch_size], pad_id)
            input_ids = batch["input_ids"].to(device)
            logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"][:, 1:].to(device)  # the token each position predicts
            logp = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="none",
                                    ignore_index=IGNORE_INDEX)
            keep = labels != IGNORE_INDEX
            out += [logp[i][keep[i]].cpu() for i in range(len(logp))]
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def answer_logprobs(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                    batch_size: int = 16, max_length: int = 256) -> list[torch.Tensor]:
    """Per example, the 1-D fp32 CPU tensor of log p(token | previous) over the answer tokens and the end of turn.

    Teacher-forced through the tokenizer's chat template (the labels `tokenize_chat` keeps), so the model is scored
    in the format it answers in; batching and padding do not change the values.
    """
    check_chat_template(tokenizer)
    _check_nonempty(prompts, "prompts")
    _check_same_length(prompts, answers, ("prompts", "answers"))
    _check_batching(batch_size, max_length)
    rows = [tokenize_chat(tokenizer, ChatExample(p, a), max_length) for p, a in zip(prompts, answers, strict=True)]
    for prompt, row in zip(prompts, rows, strict=True):
        if all(label == IGNORE_INDEX for label in row["labels"]):
            raise SafeEditError(f"the prompt {prompt[:60]!r} fills max_length={max_length} tokens and leaves no "
                                "answer token to score; raise max_length")
    return _token_logprobs(model, rows, tokenizer.pad_token_id, batch_size)


def normalized_probability(logprobs: torch.Tensor) -> float:
    """exp(mean log p) = p(answer)^(1/len) = exp(-NLL): the length-normalised answer probability.

    Definition: TOFU, evaluate_util.py, `get_all_evals` (`avg_gt_loss` = summed loss / scored tokens) with
    aggregate_eval_stat.py, `get_model_utility` (retain/forget 'Prob.': mean of exp(-avg_gt_loss));
    open-unlearning, src/evals/metrics/utils.py, `evaluate_probability`, and memorization.py, `probability`.
    """
    if logprobs.numel() == 0:
        raise SafeEditError("no token log-probabilities given; an answer needs at least one scored token")
    return float(torch.exp(logprobs.double().mean()))


def truth_ratio(paraphrased: torch.Tensor, perturbed: Sequence[torch.Tensor]) -> float:
    """One question's truth ratio from token log-probs: R = exp(-mean_j NLL(perturbed_j)) / exp(-NLL(paraphrased)).

    NLL(answer) is the answer's mean token NLL (summed NLL / scored tokens), so the perturbed answers enter through
    the GEOMETRIC mean of their length-normalised probabilities p^(1/len). R < 1: the model prefers the paraphrased
    true answer to the perturbed false ones. Definition: TOFU, evaluate_util.py, `eval_perturbation_ratio`
    (`torch.exp(gt_loss_per_token - perturb_loss_per_token.mean(-1))`) and aggregate_eval_stat.py,
    `get_forget_quality` / `get_model_utility` (the inverse, exp(mean perturbed NLL - paraphrased NLL));
    open-unlearning, src/evals/metrics/memorization.py, `truth_ratio` (`wrong_prob / (correct_prob + 1e-10)`, the
    wrong answers' per-token losses averaged before the exp). Computed here in log space without the 1e-10.
    """
    if len(perturbed) == 0:
        raise SafeEditError("a truth ratio needs at least one perturbed answer")
    for values in (paraphrased, *perturbed):
        if values.numel() == 0:
            raise SafeEditError("no token log-probabilities given; an answer needs at least one scored token")
    mean_perturbed_logp = torch.stack([p.double().mean() for p in perturbed]).mean()  # = -mean_j NLL(perturbed_j)
    return float(torch.exp(mean_perturbed_logp - paraphrased.double().mean()))


def truth_ratios(model: nn.Module, tokenizer: Any, questions: Sequence[str], paraphrased: Sequence[str],
                 perturbed: Sequence[Sequence[str]], batch_size: int = 16, max_length: int = 256) -> np.ndarray:
    """`truth_ratio` of every question (TOFU / open-unlearning: geometric mean over the perturbed answers), with the
    answers scored through the chat template by `answer_logprobs` (the end of turn included, as the references
    include the end-of-sequence token in the answer loss)."""
    _check_nonempty(questions, "questions")
    _check_same_length(questions, paraphrased, ("questions", "paraphrased answers"))
    _check_same_length(questions, perturbed, ("questions", "perturbed answer lists"))
    for question, options in zip(questions, perturbed, strict=True):
        if isinstance(options, str) or len(options) == 0:
            raise SafeEditError(f"question {question[:60]!r} needs a non-empty list of perturbed answers; "
                                "pass a list of strings per question")
    para = answer_logprobs(model, tokenizer, questions, paraphrased, batch_size, max_length)
    flat_q = [q for q, options in zip(questions, perturbed, strict=True) for _ in options]
    flat_a = [a for options in perturbed for a in options]
    pert = answer_logprobs(model, tokenizer, flat_q, flat_a, batch_size, max_length)
    ratios = np.empty(len(questions), dtype=np.float64)
    start = 0
    for i, options in enumerate(perturbed):
        ratios[i] = truth_ratio(para[i], pert[start:start + len(options)])
        start += len(options)
    return ratios


def _ratios(ratios: np.ndarray | Sequence[float]) -> np.ndarray:
    values = np.asarray(ratios, dtype=np.float64).reshape(-1)
    _check_nonempty(values, "truth ratios")
    if np.isnan(values).any() or (values < 0).any():
        raise SafeEditError("truth ratios must be non-negative numbers; compute them with truth_ratios()")
    return values


def forget_truth_ratio(ratios: np.ndarray | Sequence[float]) -> float:
    """Forget-set aggregate of the truth ratios: mean of min(R, 1/R); 1 = the model cannot tell true from false.

    Definition: TOFU, aggregate_eval_stat.py, `get_model_utility` ('forget' files: `np.minimum(R, 1/R)`);
    open-unlearning, src/evals/metrics/memorization.py, `truth_ratio`, aggregator `closer_to_1_better`
    (configs/eval/tofu_metrics/forget_Truth_Ratio.yaml).
    """
    values = _ratios(ratios)
    with np.errstate(divide="ignore"):
        return float(np.minimum(values, 1.0 / values).mean())


def retain_truth_ratio(ratios: np.ndarray | Sequence[float]) -> float:
    """Retain-set aggregate of the truth ratios: mean of max(0, 1 - R); higher = the true answers stay preferred.

    Definition: open-unlearning, src/evals/metrics/memorization.py, `truth_ratio`, aggregator `true_better`
    (configs/eval/tofu_metrics/retain_Truth_Ratio.yaml); TOFU, aggregate_eval_stat.py, `get_model_utility`
    (`np.maximum(0, 1 - 1/x)` of x = 1/R).
    """
    return float(np.maximum(0.0, 1.0 - _ratios(ratios)).mean())


def forget_quality(unlearned_ratios: np.ndarray | Sequence[float],
                   retrain_ratios: np.ndarray | Sequence[float]) -> float:
    """Forget quality: the two-sample KS p-value between the unlearned and the retrained model's per-question
    forget-set truth ratios R (high = indistinguishable from retraining).

    Definition: TOFU, aggregate_eval_stat.py, `get_forget_quality` (`ks_2samp` of exp(mean perturbed NLL -
    paraphrased NLL) = 1/R); open-unlearning, src/evals/metrics/privacy.py, `ks_test` over the `truth_ratio`
    scores (configs/eval/tofu_metrics/forget_quality.yaml), and src/evals/metrics/utils.py, `get_forget_quality`
    (1/(R + 1e-10)). The KS statistic and p-value depend only on the order of the pooled values, so R and 1/R
    give the same p-value; the raw ratio is tested, not an aggregate such as min(R, 1/R).
    """
    from scipy.stats import ks_2samp

    return float(ks_2samp(_ratios(unlearned_ratios), _ratios(retrain_ratios)).pvalue)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall (stemmed) of each prediction against its reference.

    Definition: TOFU, evaluate_util.py, `eval_rouge_recall`; open-unlearning, src/evals/metrics/utils.py,
    `eval_text_similarity` (`rougeL_recall`).
    """
    from rouge_score import rouge_scorer

    _check_nonempty(predictions, "predictions")
    _check_same_length(predictions, references, ("predictions", "references"))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(ref, pred)["rougeL"].recall) for pred, ref in zip(predictions, references, strict=True)]


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the given utility values; 0 when any of them is 0 (scipy's `hmean` also returns 0 then).

    Definition: TOFU, aggregate_eval_stat.py, `get_model_utility` (`hmean` of the nine non-forget values: answer
    probability, ROUGE-L recall and truth ratio on retain, real-authors and world-facts questions);
    open-unlearning, src/evals/metrics/utility.py, `hm_aggregate` (configs/eval/tofu_metrics/model_utility.yaml).
    Which values a caller passes is its part of the definition: `safeedit.eval.qa` records them by name.
    """
    from scipy.stats import hmean

    array = np.asarray(values, dtype=np.float64).reshape(-1)
    _check_nonempty(array, "utility values")
    if np.isnan(array).any() or (array < 0).any():
        raise SafeEditError("model utility needs non-negative metric values; pass probabilities, ratios or ROUGE")
    if (array == 0).any():
        return 0.0
    return float(hmean(array))


MIN_K = 0.4  # open-unlearning, configs/eval/tofu_metrics/mia_min_k.yaml (and muse_metrics/mia_min_k.yaml): k: 0.4


def final_token_is_eos(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                       max_length: int = 256) -> list[bool]:
    """Per example, whether the last token `answer_logprobs` scores is the tokenizer's end-of-sequence token.

    open-unlearning appends an end-of-sequence token when the chat template does not end with one and leaves the
    last labelled token out of Min-k% (src/data/utils.py, `preprocess_chat_instance`; src/evals/metrics/utils.py,
    `tokenwise_logprobs`: "-1 to ignore eos prediction"). On our labels (the template's own tokens, nothing
    appended) that is: leave the final token out when it is the end-of-sequence token, keep everything otherwise
    (after a ChatML template's `<|im_end|>` and newline the reference appends an end-of-sequence token and drops
    that one, so `<|im_end|>` and the newline stay scored in both).
    """
    check_chat_template(tokenizer)
    _check_same_length(prompts, answers, ("prompts", "answers"))
    eos = tokenizer.eos_token_id
    flags = []
    for prompt, answer in zip(prompts, answers, strict=True):
        labels = [label for label in tokenize_chat(tokenizer, ChatExample(prompt, answer), max_length)["labels"]
                  if label != IGNORE_INDEX]
        flags.append(eos is not None and len(labels) > 0 and labels[-1] == eos)
    return flags


def min_k_scores(logprobs: Sequence[torch.Tensor], k: float = MIN_K,
                 drop_final: bool | Sequence[bool] = True) -> np.ndarray:
    """Min-k% Prob per example: the mean of its lowest max(1, int(k * n)) token log-probs, n the tokens scored.

    `drop_final` (one flag, or one per example; see `final_token_is_eos`) leaves each example's final token, its
    end-of-sequence token, out before counting. Members of the training data have few very unlikely tokens, so a
    higher score is more member-like. Definition: Shi et al. 2024 (arXiv 2310.16789) as open-unlearning computes
    it: src/evals/metrics/mia/min_k.py, `MinKProbAttack.compute_score` (`max(1, int(len(lp) * self.k))`, Python's
    truncation of the float product, which is kept here; score = -mean, the negated form of ours), over
    src/evals/metrics/utils.py, `tokenwise_logprobs` (the last labelled token dropped), k = 0.4 in
    configs/eval/tofu_metrics/mia_min_k.yaml.
    """
    _check_nonempty(logprobs, "log-probability tensors")
    if not 0 < k <= 1:
        raise SafeEditError(f"k={k} is not a fraction; pass 0 < k <= 1 (0.4 = the lowest 40% of tokens)")
    drops = [drop_final] * len(logprobs) if isinstance(drop_final, bool) else list(drop_final)
    _check_same_length(logprobs, drops, ("log-probability tensors", "drop_final flags"))
    scores = np.empty(len(logprobs), dtype=np.float64)
    for i, (values, drop) in enumerate(zip(logprobs, drops, strict=True)):
        flat = values.detach().double().reshape(-1).cpu()
        flat = flat[:-1] if drop else flat
        if flat.numel() == 0:
            raise SafeEditError(f"example {i} has no token log-probabilities to score (besides an end-of-sequence "
                                "token); every example needs an answer token")
        count = max(1, int(flat.numel() * k))
        scores[i] = float(torch.sort(flat).values[:count].mean())
    return scores


def min_k_auc(member_scores: np.ndarray | Sequence[float], nonmember_scores: np.ndarray | Sequence[float]) -> float:
    """ROC-AUC of telling members (label 1) from non-members by their Min-k% score; 0.5 = no information.

    Definition: open-unlearning, src/evals/metrics/mia/utils.py, `mia_auc` (`roc_auc_score` with forget = 0,
    holdout = 1 over the negated scores: the same AUC, 1 when the forget answers are far more likely).
    """
    from sklearn.metrics import roc_auc_score

    members = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    others = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    _check_nonempty(members, "member scores")
    _check_nonempty(others, "non-member scores")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    return float(roc_auc_score(labels, np.concatenate([members, others])))


def answer_perplexity(logprobs: Sequence[torch.Tensor]) -> float:
    """exp(total NLL / total scored tokens) over answers scored by `answer_logprobs` (teacher-forced, given their
    questions through the chat template): the perplexity of the answers themselves, every token weighted alike."""
    _check_nonempty(logprobs, "log-probability tensors")
    total = torch.cat([values.detach().double().reshape(-1).cpu() for values in logprobs])
    if total.numel() == 0:
        raise SafeEditError("no token log-probabilities given; an answer needs at least one scored token")
    return float(torch.exp(-total.sum() / total.numel()))


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 256,
               batch_size: int = 8) -> float:
    """exp(total NLL / total predicted tokens) over plain `texts` (no chat template), each cut to `max_length`
    tokens; padding is excluded, so the value does not depend on the batch size."""
    _check_nonempty(texts, "texts")
    _check_batching(batch_size, max_length)
    rows = []
    for text in texts:
        ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        rows.append({"input_ids": ids, "labels": ids})  # the first token is never predicted
    if not any(len(row["input_ids"]) > 1 for row in rows):
        raise SafeEditError("every text is shorter than two tokens, so no token can be predicted; pass longer texts")
    rows = [row for row in rows if len(row["input_ids"]) > 1]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked anyway
    logprobs = _token_logprobs(model, rows, pad_id, batch_size)
    total = torch.cat(logprobs).double()
    return float(torch.exp(-total.sum() / total.numel()))


def qa_metric_names(forget_perturbed: bool, retain_perturbed: bool, holdout: bool, reference: bool,
                    retain_perplexity: bool = False) -> set[str]:
    """The metric names `qa_metrics` records for sets with (or without) perturbed forget and retain answers and
    held-out questions, with (or without) a reference's forget truth ratios: what criteria can name."""
    names = {"rouge_l_forget", "rouge_l_retain", "probability_forget", "probability_retain", "model_utility"}
    names |= {"truth_ratio_forget"} if forget_perturbed else set()
    names |= {"forget_quality"} if forget_perturbed and reference else set()
    names |= {"truth_ratio_retain"} if retain_perturbed else set()
    names |= {"mia_auc"} if holdout else set()
    return names | ({"perplexity"} if retain_perplexity else set())
