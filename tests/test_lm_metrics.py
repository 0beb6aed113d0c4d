"""Language-model unlearning metrics (safeedit.eval.language) against hand computations on tiny random models."""

from __future__ import annotations

import math

import helpers as H
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from safeedit.data.chat import IGNORE_INDEX, tokenize_chat
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError
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

WORDS = "who wrote the book where was she born paris london rome it was written by anna ben carl in a city".split()
PROMPTS = ["who wrote the book", "where was she born", "who wrote it"]
ANSWERS = ["it was written by anna", "paris", "ben wrote the book in rome a city"]


def tokenizer(template: str | None = H.CHAT_TEMPLATE):
    return H.word_chat_tokenizer(WORDS, template)


def llama():
    model = H.make_llama(0)
    model.config.pad_token_id = 0
    return model


def manual_logprobs(model, tok, prompt: str, answer: str) -> torch.Tensor:
    """Unbatched, unpadded: log_softmax of the logits one position before each answer label, at the label id."""
    row = tokenize_chat(tok, ChatExample(prompt, answer), 256)
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = (labels != IGNORE_INDEX).nonzero().flatten()
    return logp[positions - 1, labels[positions]]


# --- answer log-probabilities and truth ratios ----------------------------------------------------------------


@pytest.mark.parametrize("make", [llama, lambda: H.make_gpt2(0)], ids=["llama", "gpt2"])
def test_answer_logprobs_match_an_unbatched_computation(make):
    model, tok = make(), tokenizer()
    model.train()
    expected = [manual_logprobs(model.eval(), tok, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    model.train()
    for batch_size in (1, 2, 3):
        got = answer_logprobs(model, tok, PROMPTS, ANSWERS, batch_size=batch_size)
        assert model.training  # mode restored
        for g, e, answer in zip(got, expected, ANSWERS, strict=True):
            assert g.dtype == torch.float32 and g.device.type == "cpu" and g.dim() == 1
            assert len(g) == len(answer.split()) + 1  # answer words + end of turn
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_truth_ratios_match_a_direct_computation():
    model, tok = llama(), tokenizer()
    questions = PROMPTS[:2]
    paraphrased = ["anna wrote it", "she was born in paris"]
    perturbed = [["ben wrote it", "carl wrote the book", "anna"], ["she was born in rome"]]
    got = truth_ratios(model, tok, questions, paraphrased, perturbed, batch_size=2)
    expected, arithmetic = [], []
    for q, para, options in zip(questions, paraphrased, perturbed, strict=True):
        p_para = normalized_probability(answer_logprobs(model, tok, [q], [para])[0])
        p_pert = [normalized_probability(t) for t in answer_logprobs(model, tok, [q] * len(options), options)]
        expected.append(np.exp(np.mean(np.log(p_pert))) / p_para)  # geometric mean over perturbed (TOFU)
        arithmetic.append(np.mean(p_pert) / p_para)  # the pre-issue-19 definition
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.shape == (2,) and (got > 0).all()
    assert not np.isclose(got[0], arithmetic[0], rtol=1e-6)  # three perturbed answers of different probabilities


def test_normalized_probability_and_aggregates_by_hand():
    logprobs = torch.log(torch.tensor([0.5, 0.125]))  # p = 1/16 over 2 tokens → (1/16)^(1/2) = 0.25
    assert normalized_probability(logprobs) == pytest.approx(0.25)
    ratios = np.array([0.5, 2.0, 1.0])
    assert forget_truth_ratio(ratios) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert retain_truth_ratio(ratios) == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert forget_truth_ratio([0.25]) == pytest.approx(0.25)
    assert retain_truth_ratio([0.25, 0.75]) == pytest.approx((0.75 + 0.25) / 2)


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 1.0, 50)
    assert forget_quality(a, a) == pytest.approx(1.0)
    assert forget_quality(a, a + 5.0) < 0.01
    b = rng.uniform(0.2, 1.2, 40)
    assert forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)


# --- ROUGE, utility, Min-k% -----------------------------------------------------------------------------------


def test_rouge_l_recall_by_hand():
    scores = rouge_l_recall(["the cat sat on the mat", "paris is a city", "anna"],
                            ["the cat is on the mat", "paris is a city", "carl"])
    assert scores == pytest.approx([5 / 6, 1.0, 0.0])  # LCS "the cat on the mat": 5 of the 6 reference words


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    assert model_utility([0.3, 0.0, 0.9]) == 0.0


def test_min_k_scores_and_auc_by_hand():
    ten = torch.tensor([-0.1, -5.0, -0.2, -0.3, -3.0, -0.4, -0.5, -0.6, -0.7, -0.8])
    three = torch.tensor([-1.0, -2.0, -4.0])
    scores = min_k_scores([ten, three], k=0.2, drop_final=False)  # no end-of-sequence token to leave out
    np.testing.assert_allclose(scores, [(-5.0 - 3.0) / 2, -4.0])  # int(2.0) = 2 of 10 tokens; int(0.6) = 0 -> 1 of 3
    assert min_k_scores([three], k=1.0, drop_final=False)[0] == pytest.approx(-7 / 3)
    assert min_k_scores([three], k=1.0)[0] == pytest.approx(-1.5)  # the final (EOS) token -4.0 left out
    assert min_k_scores([torch.full((30,), -1.0)], k=0.1)[0] == pytest.approx(-1.0)
    assert min_k_auc([-0.1, -0.2], [-1.0, -2.0, -3.0]) == 1.0
    assert min_k_auc([-1.0, -2.0, -3.0], [-0.1, -0.2]) == 0.0


# --- perplexity -----------------------------------------------------------------------------------------------


def test_perplexity_matches_the_model_loss_and_ignores_padding():
    model, tok = llama(), tokenizer()
    text = "anna wrote the book in paris"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tok, [text]) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    texts = [text, "paris", "who wrote it was carl in rome a city", "ben was born in london"]
    values = [perplexity(model, tok, texts, batch_size=b) for b in (1, 2, 4)]
    assert values == pytest.approx([values[0]] * 3, rel=1e-5)
    cut = perplexity(model, tok, ["anna wrote the book in paris london rome"], max_length=6)
    assert cut == pytest.approx(perplexity(model, tok, [text]), rel=1e-5)


# --- errors ---------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    model, tok = llama(), tokenizer()
    with pytest.raises(SafeEditError, match="no chat template"):
        answer_logprobs(model, tokenizer(template=None), PROMPTS, ANSWERS)
    with pytest.raises(SafeEditError, match="no prompts"):
        answer_logprobs(model, tok, [], [])
    with pytest.raises(SafeEditError, match="3 prompts but 2 answers"):
        answer_logprobs(model, tok, PROMPTS, ANSWERS[:2])
    with pytest.raises(SafeEditError, match="raise max_length"):
        answer_logprobs(model, tok, PROMPTS[:1], ANSWERS[:1], max_length=4)
    with pytest.raises(SafeEditError, match="perturbed answer lists"):
        truth_ratios(model, tok, PROMPTS[:2], ["a", "b"], [["c"]])
    with pytest.raises(SafeEditError, match="non-empty list"):
        truth_ratios(model, tok, PROMPTS[:1], ["a"], [[]])
    with pytest.raises(SafeEditError, match="no truth ratios"):
        forget_truth_ratio([])
    with pytest.raises(SafeEditError, match="no truth ratios"):
        forget_quality([], [0.5])
    with pytest.raises(SafeEditError, match="predictions but"):
        rouge_l_recall(["a"], ["a", "b"])
    with pytest.raises(SafeEditError, match="no utility"):
        model_utility([])
    with pytest.raises(SafeEditError, match="no log-probability"):
        min_k_scores([])
    with pytest.raises(SafeEditError, match="k=0"):
        min_k_scores([torch.zeros(3)], k=0)
    with pytest.raises(SafeEditError, match="no non-member"):
        min_k_auc([0.1], [])
    with pytest.raises(SafeEditError, match="no texts"):
        perplexity(model, tok, [])
    with pytest.raises(SafeEditError, match="no token log-probabilities"):
        normalized_probability(torch.tensor([]))
