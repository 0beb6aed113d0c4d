"""SimNPO and RMU: the losses against hand computations from the published formulas, and both objectives end to end,
dense and masked, on a tiny random Llama (data and tokenizer as in test_wagle.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import helpers as H
import pytest
import torch
import torch.nn.functional as F
from test_wagle import FORGET, RETAIN, batch_of, llama, mean_nll, paired, tokenizer
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.methods import get_method, methods, resolve
from safeedit.scenario import KINDS
from safeedit.unlearn.baselines_llm import RMUOptions, SimNPOOptions
from safeedit.unlearn.lm_objectives import simnpo_loss
from safeedit.unlearn.rmu import activation_distance, decoder_layer, rmu_loss, steering_vector
from safeedit.unlearn.wagle import KIND, LMUnlearnDefaults, about, lm_unlearn


class FixedNextToken(nn.Module):
    """A 4-token 'model' whose next-token distribution is always (1/2, 1/4, 1/8, 1/8): token k costs
    NLL (1, 2, 3, 3)[k] · ln 2 wherever it is predicted. Its own loss is the mean NLL of the labelled tokens, as a
    Hugging Face causal LM's."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 8]).log())

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.logits.expand(*input_ids.shape, 4)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


def rows(*pairs):
    """A batch from (input_ids, labels) rows of one length (the fixed model reads no attention mask)."""
    ids = torch.tensor([p[0] for p in pairs])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([p[1] for p in pairs])}


# Forget: A scores answer tokens 0, 1 (NLL ln2 + 2 ln2 over 2 tokens: mean 1.5 ln2; its last position is padding),
# B scores 2, 2, 0 (3 ln2 + 3 ln2 + ln2 over 3 tokens: mean 7/3 ln2). Retain: tokens 1, 0 (mean NLL 1.5 ln2).
FIXED = {"forget": rows(([3, 0, 1, 0], [-100, 0, 1, -100]), ([3, 2, 2, 0], [-100, 2, 2, 0])),
         "retain": rows(([3, 1, 0], [-100, 1, 0]))}


def test_simnpo_loss_matches_the_published_formula_by_hand():
    # SimNPO: −(2/β) · mean_i log σ(β · (NLL_i/|y_i| − δ)), here β = 2, δ = 0.5:
    #   A: β(1.5 ln2 − 0.5) = 3 ln2 − 1, so −log σ = ln(1 + e^{−(3 ln2 − 1)}) = ln(1 + e/8)
    #   B: β(7/3 ln2 − 0.5) = 14/3 ln2 − 1, so −log σ = ln(1 + e · 2^{−14/3})
    #   forget term = (2/2) · ½ · (ln(1 + e/8) + ln(1 + e · 2^{−14/3})) = 0.19709306975366753
    # With forget weight 0.5: 0.5 · 0.19709306975366753 = 0.09854653487683377;
    # plus retain weight 3 · 1.5 ln2 = 3.1191623125197588: 3.2177088473965876.
    model = FixedNextToken()
    torch.testing.assert_close(simnpo_loss(2.0, 0.5, 0.5, 0.0)(model, FIXED), torch.tensor(0.09854653487683377))
    torch.testing.assert_close(simnpo_loss(2.0, 0.5, 0.5, 3.0)(model, FIXED), torch.tensor(3.2177088473965876))
    # δ = 0, β = 1: the margin is the mean NLL itself, 1.5 ln2 and 7/3 ln2:
    #   (2/1) · ½ · (ln(1 + 2^{−1.5}) + ln(1 + 2^{−7/3})) = 0.302733... + 0.181008... = 0.483742...
    expected = math.log(1 + 2 ** -1.5) + math.log(1 + 2 ** (-7 / 3))
    torch.testing.assert_close(simnpo_loss(1.0, 0.0, 1.0, 0.0)(model, FIXED), torch.tensor(expected))


def test_simnpo_step_raises_the_forget_nll():
    # A random model's mean NLL is about ln(100) = 4.6 per token, where β = 4.5 and δ = 0 saturate the sigmoid
    # (gradient factor σ(−20) ≈ 2e-9): that is SimNPO's stopping point, so move the margin next to it.
    tok, model = tokenizer(), llama()
    batch = paired(tok)
    simnpo_loss(1.0, 4.5, 1.0, 0.0)(model, batch).backward()
    with torch.no_grad():
        before = mean_nll(model, batch["forget"])
        for p in model.parameters():
            p -= 1e-2 * p.grad
        assert mean_nll(model, batch["forget"]) > before


def test_activation_distance_by_hand():
    # Target c·u = 5 · (0.6, 0.8) = (3, 4). Squared difference averaged over the 2 hidden units:
    #   sequence 1, answer positions 0 and 1: (3,4) → 0, (0,0) → (9 + 16)/2 = 12.5; mean 6.25 ((9,9) not scored)
    #   sequence 2, answer position 2: (7,7) → (16 + 9)/2 = 12.5; mean 12.5
    #   over the sequences: (6.25 + 12.5)/2 = 9.375 (pooling the 3 tokens instead would give 8.333...)
    hidden = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [9.0, 9.0]], [[3.0, 5.0], [1.0, 1.0], [7.0, 7.0]]])
    answer = torch.tensor([[True, True, False], [False, False, True]])
    target = 5 * torch.tensor([0.6, 0.8])
    torch.testing.assert_close(activation_distance(hidden, target, answer), torch.tensor(9.375))


def test_steering_vector_is_a_seeded_nonnegative_direction_of_norm_c():
    u = steering_vector(16, 2.0, seed=3)
    torch.testing.assert_close(u.norm(), torch.tensor(2.0))
    assert (u >= 0).all() and torch.equal(u, steering_vector(16, 2.0, seed=3))
    assert not torch.equal(u, steering_vector(16, 2.0, seed=4))


def hidden_after(model, batch, layer):
    """Independent of the hook: Hugging Face's hidden states, index layer + 1 the output of decoder layer `layer`
    (valid below the last layer, whose entry has the final norm applied)."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states[layer + 1]


def answer_mean(hidden, target, labels):
    """Per sequence: mean over its answer tokens of the mean squared difference over hidden units; then the mean.
    `target`: one vector for every position, or hidden states of the same shape."""
    target = target.expand_as(hidden)
    means = []
    for i in range(len(labels)):
        tokens = [((hidden[i, t] - target[i, t]) ** 2).mean() for t in range(labels.shape[1]) if labels[i, t] != -100]
        means.append(torch.stack(tokens).mean())
    return torch.stack(means).mean()


def test_rmu_loss_matches_hand_computation_on_layer_0():
    tok, model, original = tokenizer(), llama(0), llama(1)
    batch = paired(tok)
    path = decoder_layer(model, 0)
    assert path == "model.layers.0"
    c, seed, alpha = 3.0, 5, 2.0
    target = steering_vector(model.config.hidden_size, c, seed)
    forget_term = answer_mean(hidden_after(model, batch["forget"], 0), target, batch["forget"]["labels"])
    retain_term = answer_mean(hidden_after(model, batch["retain"], 0), hidden_after(original, batch["retain"], 0),
                              batch["retain"]["labels"])
    assert retain_term > 0
    loss = rmu_loss(original, path, c, seed, alpha)(model, batch)
    torch.testing.assert_close(loss, forget_term + alpha * retain_term, rtol=1e-5, atol=1e-5)
    at_original = rmu_loss(llama(0), path, c, seed, alpha)(model, batch)  # the retain term vanishes
    torch.testing.assert_close(at_original, forget_term, rtol=1e-5, atol=1e-5)


def run(method, options, seed=0):
    tok, model = tokenizer(), llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    edited, mask = lm_unlearn(model, tok, FORGET, RETAIN, method, options, seed=seed, progress=False)
    for name, p in model.named_parameters():  # the input is the frozen original: untouched
        assert torch.equal(p.detach(), before[name]), name
    return model, edited, mask, before


@pytest.mark.parametrize("masked", [False, True])
def test_simnpo_end_to_end_dense_and_random_mask(masked):
    options = SimNPOOptions(epochs=2, lr=1e-2, batch_size=2, ratio=0.1, beta=1.0, delta=4.5, forget_weight=1.0,
                            retain_weight=0.1)  # δ near a random model's NLL per token (see above)
    model, edited, mask, before = run("simnpo+random" if masked else "simnpo", options)
    changed = sum(int((p.detach() != before[name]).sum()) for name, p in edited.named_parameters())
    assert changed > 0 and (mask is not None) == masked
    if masked:
        for name, p in edited.named_parameters():
            assert torch.equal(p.detach()[~mask.tensors[name]], before[name][~mask.tensors[name]]), name
    forget = batch_of(FORGET, tokenizer())
    with torch.no_grad():
        assert mean_nll(edited, forget) > mean_nll(model, forget)


@pytest.mark.parametrize("masked", [False, True])
def test_rmu_end_to_end_dense_and_random_mask(masked):
    options = RMUOptions(epochs=2, lr=1e-2, batch_size=2, ratio=0.1, layer=0, steering_coeff=4.0)
    model, edited, mask, before = run("rmu+random" if masked else "rmu", options, seed=2)
    for name, p in edited.named_parameters():
        if masked:
            assert torch.equal(p.detach()[~mask.tensors[name]], before[name][~mask.tensors[name]]), name
        if not name.startswith("model.layers.0.") and name != "model.embed_tokens.weight":
            assert torch.equal(p.detach(), before[name]), name  # above the steered layer: no gradient
    assert any(not torch.equal(p.detach(), before[n]) for n, p in edited.named_parameters())
    forget, target = batch_of(FORGET, tokenizer()), steering_vector(model.config.hidden_size, 4.0, seed=2)
    distance = {which: answer_mean(hidden_after(m, forget, 0), target, forget["labels"])
                for which, m in (("before", model), ("after", edited))}
    assert distance["after"] < distance["before"]  # the forget hidden states moved toward c·u


@pytest.mark.parametrize(("method", "options"), [
    ("simnpo+random", SimNPOOptions(epochs=1, lr=1e-2, batch_size=2, ratio=0.1)),
    ("rmu", RMUOptions(epochs=1, lr=1e-2, batch_size=2, layer=1)),
])
def test_the_same_seed_repeats_the_same_edit(method, options):
    _, first, _, _ = run(method, options, seed=7)
    _, second, _, _ = run(method, options, seed=7)
    _, other, _, _ = run(method, options, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))


def test_options_are_validated_and_defaults_name_their_source():
    rmu, simnpo = get_method(KIND, "rmu"), get_method(KIND, "simnpo")
    with pytest.raises(SafeEditError, match="beta"):
        rmu.validate({"beta": 1})
    with pytest.raises(SafeEditError, match="layer"):
        simnpo.validate({"layer": 3})
    with pytest.raises(SafeEditError, match="steering_coeff"):
        rmu.validate({"steering_coeff": 0})
    with pytest.raises(SafeEditError, match="alpha"):  # open-unlearning's `alpha` is `retain_weight`, one name
        rmu.validate({"alpha": 5})
    assert (rmu.validate({}).layer, rmu.validate({}).steering_coeff, rmu.validate({}).retain_weight) == (7, 2.0, 1.0)
    defaults = simnpo.validate({})
    assert (defaults.beta, defaults.delta, defaults.forget_weight, defaults.retain_weight) == (4.5, 0.0, 0.125, 1.0)


def test_scenario_defaults_give_beta_to_npo_only_and_own_options_pass_whole():
    scenario = KINDS[KIND](name="tiny", kind=KIND, request={"what": "x"}, model={"name": "somewhere"},
                           data={"protocol": "capitals"}, unlearning={"lr": 2e-3, "beta": 0.3},
                           methods={"npo": None, "simnpo+wagle": None, "rmu": {"layer": 1, "steering_coeff": 5}})
    options = scenario.method_options()
    assert options["npo"].beta == 0.3 and options["npo"].lr == 2e-3
    assert options["simnpo+wagle"].beta == 4.5 and options["simnpo+wagle"].lr == 2e-3  # SimNPO's own β
    assert (options["rmu"].layer, options["rmu"].steering_coeff, options["rmu"].lr) == (1, 5.0, 2e-3)
    assert LMUnlearnDefaults.for_method(RMUOptions(layer=1), RMUOptions)["layer"] == 1  # lm_unlearn's path


def test_a_missing_layer_fails_before_training_and_names_register():
    tok, model = tokenizer(), llama()
    with pytest.raises(SafeEditError, match="layer 7 does not exist; the model has 2 decoder layers"):
        lm_unlearn(model, tok, FORGET, RETAIN, "rmu+wagle", RMUOptions(epochs=1), progress=False)
    with pytest.raises(SafeEditError, match="no list of decoder layers"):
        decoder_layer(H.make_mlp(), 0)
    assert list(methods(KIND))[-2:] == ["simnpo", "rmu"]
    for name in ("simnpo+wagle", "rmu+random", "rmu"):
        resolved = resolve(KIND, name)
        assert resolved.spec.name == name.partition("+")[0]
        assert about(resolved)["limitations"].startswith("Approximate unlearning")
    assert "open-unlearning's RMU.yaml" in get_method(KIND, "rmu").limitations
