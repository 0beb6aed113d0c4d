"""LLM unlearning objectives and WAGLE, on tiny random Llama and GPT-2 models with a word-level chat tokenizer."""

from __future__ import annotations

import gc
import weakref

import helpers as H
import pytest
import torch
import torch.nn.functional as F

from safeedit.attribution import compute_scores
from safeedit.data.chat import chat_loader
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError
from safeedit.methods import methods, resolve
from safeedit.unlearn.lm_objectives import (
    REFUSALS,
    LMUnlearnData,
    graddiff_loss,
    npo_loss,
    paired_retain,
    refusal_examples,
    refusal_loss,
)
from safeedit.unlearn.wagle import KIND, LMUnlearnOptions, about, lm_unlearn

WORDS = ("who wrote the red garden what is capital of france paris velira wrote it she was born in lima peru "
         "her father a baker japan tokyo").split()
FORGET = [ChatExample("who wrote the red garden", "velira wrote it"),
          ChatExample("where was velira born", "she was born in lima peru"),
          ChatExample("what is her father", "her father was a baker")]
RETAIN = [ChatExample("what is the capital of france", "paris is the capital of france"),
          ChatExample("what is the capital of japan", "tokyo is the capital of japan"),
          ChatExample("who was born in lima", "velira was born in lima")]


def tokenizer():
    return H.word_chat_tokenizer(WORDS)


def llama(seed: int = 0):
    model = H.make_llama(seed)
    model.config.pad_token_id = 0
    model.generation_config.pad_token_id = 0
    return model


def batch_of(examples, tok):
    return next(iter(chat_loader(tok, examples, batch_size=len(examples))))


def token_nlls(model, batch):
    """Hand computation: −log p of every label token, per example, from the raw logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = []
    for i in range(len(batch["input_ids"])):
        values = []
        for t in range(1, batch["input_ids"].shape[1]):
            label = batch["labels"][i, t].item()
            if label != -100:
                values.append(-F.log_softmax(logits[i, t - 1], dim=-1)[label])
        rows.append(torch.stack(values))
    return rows


def mean_nll(model, batch):
    return torch.cat(token_nlls(model, batch)).mean()


def paired(tok, forget=FORGET, retain=RETAIN):
    return {"forget": batch_of(forget, tok), "retain": batch_of(retain, tok)}


def test_graddiff_loss_matches_hand_computation():
    tok, model = tokenizer(), llama()
    batch = paired(tok)
    expected = -mean_nll(model, batch["forget"]) + 0.5 * mean_nll(model, batch["retain"])
    torch.testing.assert_close(graddiff_loss(0.5)(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_npo_loss_matches_hand_computation():
    tok, model, reference = tokenizer(), llama(0), llama(1)
    batch = paired(tok)
    beta = 0.1
    nll = torch.stack([row.sum() for row in token_nlls(model, batch["forget"])])
    nll_ref = torch.stack([row.sum() for row in token_nlls(reference, batch["forget"])])
    expected = (-(2 / beta) * torch.log(torch.sigmoid(beta * (nll - nll_ref)))).mean() \
        + 2.0 * mean_nll(model, batch["retain"])
    torch.testing.assert_close(npo_loss(reference, beta, 2.0)(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_npo_at_the_reference_is_2_log_2_over_beta_and_pushes_forget_nll_up():
    tok, model = tokenizer(), llama(0)
    batch = paired(tok)
    loss = npo_loss(llama(0), 0.1, 0.0)(model, batch)
    torch.testing.assert_close(loss, torch.tensor(2 / 0.1 * torch.log(torch.tensor(2.0)).item()))
    loss.backward()  # the gradient step direction increases the forget NLL
    with torch.no_grad():
        before = mean_nll(model, batch["forget"])
        for p in model.parameters():
            p -= 1e-2 * p.grad
        assert mean_nll(model, batch["forget"]) > before


def test_refusal_loss_is_the_nll_of_refusal_answers():
    tok, model = tokenizer(), llama()
    refusals = refusal_examples(FORGET, seed=3)
    assert [e.prompt for e in refusals] == [e.prompt for e in FORGET]
    assert all(e.answer in REFUSALS for e in refusals)
    batch = paired(tok, refusals)
    expected = mean_nll(model, batch["forget"]) + mean_nll(model, batch["retain"])
    torch.testing.assert_close(refusal_loss(1.0)(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_paired_loader_pairs_every_forget_example_with_one_retain_example():
    tok = tokenizer()
    pairs = paired_retain(FORGET, RETAIN[:2], seed=0)
    assert len(pairs) == len(FORGET) and set(pairs) <= set(RETAIN[:2])
    batches = list(LMUnlearnData(tok, FORGET, RETAIN, batch_size=2, seed=0).loader())
    assert [len(b["forget"]["input_ids"]) for b in batches] == [2, 1]
    assert all(len(b["forget"]["input_ids"]) == len(b["retain"]["input_ids"]) for b in batches)


def test_wagle_scores_match_direct_autograd():
    tok, model = tokenizer(), llama()
    forget = chat_loader(tok, FORGET, batch_size=2)
    retain = chat_loader(tok, RETAIN, batch_size=2)
    gamma = 0.5
    scores = compute_scores(model, "wagle", {"forget": forget, "retain": retain}, options={"gamma": gamma},
                            progress=False)
    params = dict(model.named_parameters())

    def summed_gradient(loader):
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for batch in loader:
            grads = torch.autograd.grad(model(**batch).loss, list(params.values()))
            for name, g in zip(params, grads, strict=True):
                total[name] += g
        return total

    model.eval()
    g_f, g_r = summed_gradient(forget), summed_gradient(retain)
    for name, p in params.items():
        expected = ((p.detach() - g_r[name] / gamma) * g_f[name]).abs()
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["npo+wagle", "graddiff+random", "refusal+saliency"])
def test_masked_out_weights_stay_bit_identical(method):
    tok, model = tokenizer(), llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    options = LMUnlearnOptions(epochs=2, lr=1e-2, batch_size=2, ratio=0.1)
    edited, mask = lm_unlearn(model, tok, FORGET, RETAIN, method, options, seed=0, progress=False)
    assert abs(mask.density - 0.1) < 1e-3
    changed = 0
    for name, p in edited.named_parameters():
        keep = mask.tensors[name]
        assert torch.equal(p.detach()[~keep], before[name][~keep]), name
        changed += int((p.detach() != before[name]).sum())
        assert torch.equal(dict(model.named_parameters())[name].detach(), before[name])  # input untouched
        assert dict(model.named_parameters())[name].requires_grad
    assert changed > 0


def test_dense_unlearning_raises_forget_loss_on_gpt2_and_repeats_with_the_same_seed():
    tok = tokenizer()
    model = H.make_gpt2()
    model.config.pad_token_id = 0
    model.resize_token_embeddings(len(tok))
    options = LMUnlearnOptions(epochs=3, lr=5e-3, batch_size=3)
    first, mask = lm_unlearn(model, tok, FORGET, RETAIN, "graddiff", options, seed=1, progress=False)
    second, _ = lm_unlearn(model, tok, FORGET, RETAIN, "graddiff", options, seed=1, progress=False)
    assert mask is None
    forget = batch_of(FORGET, tok)
    with torch.no_grad():
        assert mean_nll(first, forget) > mean_nll(model, forget) + 0.1
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_requests_fail_with_clear_errors():
    tok, model = tokenizer(), llama()
    options = LMUnlearnOptions(epochs=1)
    with pytest.raises(SafeEditError, match="forget set is empty"):
        lm_unlearn(model, tok, [], RETAIN, "npo", options, progress=False)
    with pytest.raises(SafeEditError, match="both the forget and the retain set"):
        lm_unlearn(model, tok, FORGET, [*RETAIN, FORGET[0]], "npo", options, progress=False)
    with pytest.raises(SafeEditError, match="retain set is empty"):
        lm_unlearn(model, tok, FORGET, [], "npo", options, progress=False)
    with pytest.raises(SafeEditError, match="no chat template"):
        lm_unlearn(model, H.word_chat_tokenizer(WORDS, None), FORGET, RETAIN, "npo", options, progress=False)
    with pytest.raises(SafeEditError, match="unknown method 'dpo'; choose from graddiff, npo, refusal"):
        lm_unlearn(model, tok, FORGET, RETAIN, "dpo+wagle", options, progress=False)
    with pytest.raises(SafeEditError, match="unknown mask score 'fisher'; one of wagle"):
        lm_unlearn(model, tok, FORGET, RETAIN, "npo+fisher", options, progress=False)


def test_objectives_are_registered_and_names_resolve_once():
    assert list(methods("llm-unlearning")) == ["graddiff", "npo", "refusal", "simnpo", "rmu"]
    dense, masked = resolve(KIND, "npo"), resolve(KIND, "graddiff+wagle")
    assert (dense.spec.name, dense.mask_score) == ("npo", None)
    assert (masked.spec.name, masked.mask_score) == ("graddiff", "wagle")
    assert about(dense)["summary"].endswith("; every weight may change")
    assert "WAGLE attribution" in about(masked)["summary"] and about(masked)["limitations"].startswith("Approximate")


def test_unlearned_copy_is_freed_once_dropped():
    # Regression: a signature cache keyed on the bound `forward` kept every edited copy alive (~1 GB per run on
    # SmolLM2; a long benchmark process was OOM-killed).
    tok, model = tokenizer(), llama()
    edited, _ = lm_unlearn(model, tok, FORGET, RETAIN, "npo+wagle", LMUnlearnOptions(epochs=1, batch_size=2),
                           seed=0, progress=False)
    alive = weakref.ref(edited)
    del edited
    gc.collect()
    assert alive() is None
