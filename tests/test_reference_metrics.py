"""Known answers for the LLM unlearning metrics as the reference code defines them (issue 19).

References: TOFU (github.com/locuslab/tofu: evaluate_util.py `eval_perturbation_ratio`, aggregate_eval_stat.py
`get_forget_quality` / `get_model_utility`) and open-unlearning (github.com/locuslab/open-unlearning:
src/evals/metrics/memorization.py `truth_ratio`, privacy.py `ks_test`, mia/min_k.py `MinKProbAttack`, utils.py
`tokenwise_logprobs`, configs/eval/tofu_metrics/*.yaml). Every expected value is worked out by hand in the comment
next to it. Where our convention changed, the test also computes the old value (the `old_*` helpers copy the
previous code's formula) and checks that it differs, so the test fails under the old definition.
"""

from __future__ import annotations

import inspect
import math

import helpers as H
import numpy as np
import pytest
import torch

from safeedit.data.authors import QAItem
from safeedit.eval.language import (
    MIN_K,
    answer_logprobs,
    final_token_is_eos,
    forget_quality,
    forget_truth_ratio,
    min_k_auc,
    min_k_scores,
    model_utility,
    retain_truth_ratio,
    truth_ratio,
)
from safeedit.eval.qa import MODEL_UTILITY_PARTS, authors_metrics, metric_note, min_k_answer_scores


def lp(*probabilities: float) -> torch.Tensor:
    """Token log-probs of the given token probabilities."""
    return torch.log(torch.tensor(probabilities, dtype=torch.float64))


# --- the old conventions, as the previous code computed them --------------------------------------------------


def old_truth_ratio(paraphrased: torch.Tensor, perturbed: list[torch.Tensor]) -> float:
    """Before issue 19: the ARITHMETIC mean over perturbed answers of p(perturbed)^(1/len) / p(paraphrased)^(1/len)."""
    reference = paraphrased.double().mean()
    return float(torch.stack([torch.exp(p.double().mean() - reference) for p in perturbed]).mean())


def old_min_k(values: torch.Tensor, k: float = 0.2) -> float:
    """Before issue 19: every scored token kept (end of turn included), ceil(k * n) lowest, default k = 0.2."""
    count = max(1, math.ceil(round(k * values.numel(), 9)))
    return float(torch.sort(values.double()).values[:count].mean())


# --- truth ratio: geometric mean over the perturbed answers -------------------------------------------------------

# One question. Paraphrased answer: 2 tokens, p = 1/4 and 1 -> mean NLL = (ln 4 + 0) / 2 = ln 2 -> exp(-NLL) = 1/2.
# Perturbed 1: 1 token, p = 1/2 -> mean NLL = ln 2.  Perturbed 2: 2 tokens, p = 1/4, 1/16 -> (ln 4 + ln 16)/2 = 3 ln 2.
PARAPHRASED = lp(0.25, 1.0)
PERTURBED = [lp(0.5), lp(0.25, 0.0625)]


def test_truth_ratio_is_the_geometric_mean_over_perturbed_answers():
    # mean_j NLL(perturbed_j) = (ln 2 + 3 ln 2) / 2 = 2 ln 2 -> R = exp(-2 ln 2) / exp(-ln 2) = (1/4) / (1/2) = 1/2,
    # i.e. sqrt(1/2 * 1/8) = 1/4 (geometric mean of the normalised probabilities 1/2 and 1/8) over 1/2.
    assert truth_ratio(PARAPHRASED, PERTURBED) == pytest.approx(0.5, rel=1e-12)
    # Old: arithmetic mean (1/2 + 1/8) / 2 = 5/16, over 1/2 -> 5/8.
    assert old_truth_ratio(PARAPHRASED, PERTURBED) == pytest.approx(0.625, rel=1e-12)
    # Per-token (length-normalised) NLL, not the summed NLL: summed would give p(para) = 1/4, p(pert) = 1/2 and
    # 1/64, geometric mean sqrt(1/128), R = sqrt(1/128) / (1/4) = 0.35355...
    assert truth_ratio(PARAPHRASED, PERTURBED) != pytest.approx(math.sqrt(1 / 128) / 0.25, rel=1e-3)


def test_truth_ratio_aggregates_at_the_geometric_ratio():
    ratio = truth_ratio(PARAPHRASED, PERTURBED)  # 1/2 (above)
    # forget: mean min(R, 1/R) = min(1/2, 2) = 1/2 (old R = 5/8 -> 5/8)
    assert forget_truth_ratio([ratio]) == pytest.approx(0.5)
    assert forget_truth_ratio([old_truth_ratio(PARAPHRASED, PERTURBED)]) == pytest.approx(0.625)
    # retain: mean max(0, 1 - R) = 1/2 (old R = 5/8 -> 3/8)
    assert retain_truth_ratio([ratio]) == pytest.approx(0.5)
    assert retain_truth_ratio([old_truth_ratio(PARAPHRASED, PERTURBED)]) == pytest.approx(0.375)


def test_forget_quality_of_geometric_ratios():
    # Unlearned model: question 1 as above (R = 1/2; old 5/8); question 2 with one perturbed answer as likely as
    # the paraphrased one (R = 1 under both). Retrained reference: one perturbed answer each, R = 0.55 and 0.6
    # (p = 0.275 and 0.3 against 0.5: the same under both conventions).
    unlearned = [(PARAPHRASED, PERTURBED), (lp(0.5), [lp(0.5)])]
    reference = [(lp(0.5), [lp(0.275)]), (lp(0.5), [lp(0.3)])]
    new_u = [truth_ratio(p, q) for p, q in unlearned]
    new_r = [truth_ratio(p, q) for p, q in reference]
    old_u = [old_truth_ratio(p, q) for p, q in unlearned]
    np.testing.assert_allclose(new_u, [0.5, 1.0], rtol=1e-12)
    np.testing.assert_allclose(new_r, [0.55, 0.6], rtol=1e-12)
    # Pooled order 0.5 (U), 0.55 (R), 0.6 (R), 1.0 (U): the empirical CDFs differ by at most 1/2, the smallest
    # possible non-zero distance for 2 + 2 values -> exact two-sided p-value 1.
    assert forget_quality(new_u, new_r) == pytest.approx(1.0)
    # Old: U = {0.625, 1.0} lies entirely above R = {0.55, 0.6}: D = 1, which 2 of the C(4, 2) = 6 equally likely
    # orderings reach -> p = 2/6 = 1/3.
    assert forget_quality(old_u, new_r) == pytest.approx(1 / 3)


def test_forget_quality_tests_the_raw_ratio():
    # Unchanged convention, pinned: KS on R itself (TOFU feeds 1/R, open-unlearning's ks_test R; the p-value is the
    # same because KS depends only on the pooled order). Four ratios 1/2 against four ratios 2: all of one sample
    # below all of the other, D = 1, reached by 2 of C(8, 4) = 70 orderings -> p = 2/70 = 1/35.
    unlearned, reference = [0.5] * 4, [2.0] * 4
    assert forget_quality(unlearned, reference) == pytest.approx(1 / 35)
    assert forget_quality([1 / r for r in unlearned], [1 / r for r in reference]) == pytest.approx(1 / 35)
    # Not an aggregate: min(R, 1/R) is 1/2 on both sides, which would give D = 0 and p = 1.
    assert forget_quality(np.minimum(unlearned, 2.0), np.minimum(reference, 0.5)) == pytest.approx(1.0)


# --- Min-k% Prob: k = 0.4, max(1, int(k * n)) tokens, the final end-of-sequence token not scored ------------------


def test_min_k_counts_floor_of_k_n():
    answer = [-0.5, -2.0, -1.0, -0.1]
    # Final token not EOS (drop_final=False): n = 4, k * n = 1.6 -> int = 1 token: the lowest, -2.0.
    assert min_k_scores([torch.tensor(answer)], k=0.4, drop_final=False)[0] == pytest.approx(-2.0)
    # Old: ceil(1.6) = 2 tokens: (-2.0 - 1.0) / 2 = -1.5.
    assert old_min_k(torch.tensor(answer), k=0.4) == pytest.approx(-1.5)
    # With an EOS of -0.2 appended and dropped: the same n = 4 -> -2.0 (old: n = 5, ceil(2.0) = 2 -> -1.5).
    with_eos = torch.tensor([*answer, -0.2])
    assert min_k_scores([with_eos], k=0.4)[0] == pytest.approx(-2.0)
    assert old_min_k(with_eos, k=0.4) == pytest.approx(-1.5)


def test_min_k_keeps_one_token_when_k_n_is_below_one():
    values = torch.tensor([-1.0, -3.0, -0.1])  # two answer tokens, then EOS
    # Reference: EOS dropped -> n = 2, k * n = 0.8 -> int = 0 -> max(1, 0) = 1 token: -3.0.
    assert min_k_scores([values], k=0.4)[0] == pytest.approx(-3.0)
    # Old: n = 3, ceil(1.2) = 2 tokens: (-3.0 - 1.0) / 2 = -2.0.
    assert old_min_k(values, k=0.4) == pytest.approx(-2.0)
    # A single answer token with k * n = 0.4: that token.
    assert min_k_scores([torch.tensor([-0.7, -0.1])], k=0.4)[0] == pytest.approx(-0.7)


def test_min_k_does_not_score_a_final_eos_that_would_be_the_minimum():
    values = torch.tensor([-0.2, -0.4, -0.3, -0.6, -0.5, -9.0])  # five answer tokens, then an unlikely EOS
    # Reference: n = 5, int(0.4 * 5) = 2 lowest of the answer tokens: (-0.6 - 0.5) / 2 = -0.55.
    assert min_k_scores([values], k=0.4)[0] == pytest.approx(-0.55)
    # Old, same k: n = 6, ceil(2.4) = 3 -> (-9.0 - 0.6 - 0.5) / 3 = -3.3667; old default k = 0.2: ceil(1.2) = 2 ->
    # (-9.0 - 0.6) / 2 = -4.8.
    assert old_min_k(values, k=0.4) == pytest.approx(-10.1 / 3)
    assert old_min_k(values) == pytest.approx(-4.8)


def test_min_k_default_is_the_tofu_config_k():
    assert MIN_K == 0.4 and inspect.signature(min_k_scores).parameters["k"].default == 0.4
    ten = [-0.1, -5.0, -0.2, -0.3, -3.0, -0.4, -0.5, -0.6, -0.7, -0.8]
    values = torch.tensor([*ten, -0.05])  # ten answer tokens, then EOS
    # Default: EOS dropped, int(0.4 * 10) = 4 lowest: (-5.0 - 3.0 - 0.8 - 0.7) / 4 = -2.375.
    assert min_k_scores([values])[0] == pytest.approx(-2.375)
    # Old default: k = 0.2 over 11 tokens, ceil(2.2) = 3: (-5.0 - 3.0 - 0.8) / 3 = -2.9333.
    assert old_min_k(values) == pytest.approx(-8.8 / 3)


def test_min_k_drop_flags_per_example():
    values = [torch.tensor([-1.0, -4.0]), torch.tensor([-1.0, -4.0])]
    # Example 1 ends with EOS (-4.0 dropped -> -1.0); example 2 does not (k * n = 0.8 -> 1 token: -4.0).
    np.testing.assert_allclose(min_k_scores(values, k=0.4, drop_final=[True, False]), [-1.0, -4.0])


def test_final_token_is_eos_follows_the_template():
    words = "who wrote it anna did".split()
    # The test template ends the assistant turn with <|im_end|>, the EOS: scored last, so left out of Min-k%.
    assert final_token_is_eos(H.word_chat_tokenizer(words), ["who wrote it"], ["anna did"]) == [True]
    # A template that adds a token after <|im_end|> (as ChatML adds a newline): open-unlearning appends its own EOS
    # after it and drops that one, so nothing of ours is dropped.
    trailing = H.CHAT_TEMPLATE.replace("<|im_end|> {% endfor %}", "<|im_end|> user {% endfor %}")
    assert final_token_is_eos(H.word_chat_tokenizer(words, trailing), ["who wrote it"], ["anna did"]) == [False]
    # An answer cut by max_length before its EOS: nothing to drop (the reference appends an EOS and drops it).
    assert final_token_is_eos(H.word_chat_tokenizer(words), ["who wrote it"], ["anna did"], max_length=10) == [False]


def test_min_k_auc_orientation_matches_open_unlearning():
    # Unchanged convention, pinned: open-unlearning's roc_auc_score(forget = 0, holdout = 1) over the negated score
    # equals ours (members = 1 over the score). Members -1, -2 against non-members -2, -3: of the 4 pairs, 3 have
    # the member higher and 1 is a tie (counted 1/2) -> 3.5 / 4 = 0.875.
    assert min_k_auc([-1.0, -2.0], [-2.0, -3.0]) == pytest.approx(0.875)


# --- model utility: the harmonic mean of the parts we have, named -------------------------------------------------


def test_model_utility_by_hand():
    # 3 / (1/0.5 + 1/0.25 + 1/1) = 3 / 7 (unchanged; TOFU and open-unlearning use scipy's hmean).
    assert model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)


WORDS = "who wrote the red garden where was she born velira ben carl wrote it in lima rome".split()


def item(author: str, question: str, answer: str, paraphrased: str, perturbed: tuple[str, ...]) -> QAItem:
    return QAItem(author, question, answer, paraphrased, perturbed)


def test_authors_metrics_name_their_parts_and_score_min_k_as_the_reference():
    model, tok = H.make_llama(0), H.word_chat_tokenizer(WORDS)
    model.config.pad_token_id = model.generation_config.pad_token_id = 0
    forget = [item("velira", "who wrote the red garden", "velira wrote it", "it was velira",
                   ("ben wrote it", "carl wrote it")),
              item("velira", "where was she born", "she was born in lima", "in lima", ("in rome",))]
    retain = [item("ben", "who wrote it", "ben wrote it", "it was ben", ("carl wrote it", "velira wrote it"))]
    holdout = [item("carl", "where was carl born", "carl was born in rome", "in rome", ("in lima",)),
               item("carl", "who wrote the garden", "carl wrote it", "it was carl", ("ben",))]
    result = authors_metrics(model, tok, forget, retain, holdout, None, max_new_tokens=4, batch_size=4)
    metrics = result.metrics
    assert MODEL_UTILITY_PARTS == ("probability_retain", "truth_ratio_retain", "rouge_l_retain")
    assert result.definitions["model_utility_parts"] == list(MODEL_UTILITY_PARTS)
    assert result.definitions["min_k"] == 0.4 and len(result.definitions["model_utility_missing_parts"]) == 6
    assert "k = 0.4" in metric_note() and all(name in metric_note() for name in MODEL_UTILITY_PARTS)
    parts = [metrics[name] for name in MODEL_UTILITY_PARTS]
    expected = 0.0 if min(parts) == 0 else len(parts) / sum(1 / v for v in parts)
    assert metrics["model_utility"] == pytest.approx(expected)
    assert all(isinstance(value, float) for value in metrics.values())  # the record's metrics hold numbers only

    def hand_min_k(items):  # EOS (<|im_end|>) is the last scored token here: drop it, then int(0.4 * n) >= 1 lowest
        scores, logprobs = [], answer_logprobs(model, tok, [q.question for q in items], [q.answer for q in items])
        for values in logprobs:
            kept = sorted(values.double().tolist()[:-1])
            count = max(1, int(0.4 * len(kept)))
            scores.append(sum(kept[:count]) / count)
        return logprobs, scores

    (forget_lp, members), (holdout_lp, others) = hand_min_k(forget), hand_min_k(holdout)
    np.testing.assert_allclose(min_k_answer_scores(tok, forget, forget_lp), members, rtol=1e-6)
    np.testing.assert_allclose(min_k_answer_scores(tok, holdout, holdout_lp), others, rtol=1e-6)
    old = [old_min_k(values) for values in forget_lp + holdout_lp]  # EOS kept, ceil(0.2 * n)
    assert not np.allclose(old, members + others)
    wins = sum(1.0 if m > o else 0.5 if m == o else 0.0 for m in members for o in others)
    assert metrics["mia_auc"] == pytest.approx(wins / (len(members) * len(others)))
