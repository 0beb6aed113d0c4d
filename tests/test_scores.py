"""Every score function against a direct autograd / forward-hook computation on tiny models."""

from __future__ import annotations

import helpers as H
import pytest
import torch
from torch import nn

from safeedit import Mask, SafeEditError, compute_scores
from safeedit.masks import target_count

TOL = {"rtol": 1e-5, "atol": 1e-7}


def scores(model, score, data=None, **kwargs):
    return compute_scores(model, score, data, progress=False, **kwargs)


def assert_close(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert actual[name].shape == value.shape, name
        torch.testing.assert_close(actual[name], value, **(tol or TOL), msg=lambda m, n=name: f"{n}: {m}")


MODELS = {
    "mlp": (H.make_mlp, {"shape": (6,), "classes": 3}),
    "cnn": (H.make_cnn, {"shape": (1, 6, 6), "classes": 4}),
}


@pytest.fixture(params=sorted(MODELS))
def model_and_data(request):
    make, data_kwargs = MODELS[request.param]
    model = make(seed=3).train()  # train mode on entry: the scores must still be computed in eval mode
    forget = H.classification_batches(3, seed=10, **data_kwargs)
    retain = H.classification_batches(4, seed=20, **data_kwargs)
    return model, forget, retain


def data_for(score: str, forget, retain):
    return {
        "saliency": {"forget": forget},
        "wagle": {"forget": forget, "retain": retain},
        "fisher": {"data": forget},
        "wanda": {"calibration": forget},
        "magnitude": None,
        "random": None,
    }[score]


# --- each score against its definition ------------------------------------------------------------------------


def test_saliency_is_abs_of_summed_forget_gradient(model_and_data):
    model, forget, _ = model_and_data
    expected = {n: g.abs() for n, g in H.gradient_sum(model, forget).items()}
    assert_close(scores(model, "saliency", {"forget": forget}), expected)


def test_saliency_is_not_sum_of_abs(model_and_data):
    """|Σ g| differs from Σ |g| (catches accumulating absolute values batch by batch)."""
    model, forget, _ = model_and_data
    per_batch = H.per_batch_gradients(model, forget)
    sum_of_abs = {n: sum(g[n].abs() for g in per_batch) for n in per_batch[0]}
    result = scores(model, "saliency", {"forget": forget})
    assert any(not torch.allclose(result[n], sum_of_abs[n]) for n in result)


def test_wagle_matches_definition_with_non_default_gamma(model_and_data):
    model, forget, retain = model_and_data
    gamma = 0.37
    g_f = H.gradient_sum(model, forget)
    g_r = H.gradient_sum(model, retain)
    weights = dict(model.named_parameters())
    expected = {n: ((weights[n].detach() - g_r[n] / gamma) * g_f[n]).abs() for n in g_f}
    result = scores(model, "wagle", {"forget": forget, "retain": retain}, options={"gamma": gamma})
    assert_close(result, expected)
    default = scores(model, "wagle", {"forget": forget, "retain": retain})
    assert any(not torch.allclose(default[n], result[n]) for n in result), "gamma had no effect"


def test_wagle_swapping_roles_changes_scores(model_and_data):
    model, forget, retain = model_and_data
    a = scores(model, "wagle", {"forget": forget, "retain": retain}, options={"gamma": 0.5})
    b = scores(model, "wagle", {"forget": retain, "retain": forget}, options={"gamma": 0.5})
    assert any(not torch.allclose(a[n], b[n]) for n in a)


def test_fisher_is_sum_of_squared_batch_gradients(model_and_data):
    model, forget, _ = model_and_data
    assert_close(scores(model, "fisher", {"data": forget}), H.squared_gradient_sum(model, forget))


def test_magnitude_is_abs_weight(model_and_data):
    model, _, _ = model_and_data
    result = scores(model, "magnitude")
    expected = {n: p.detach().abs() for n, p in model.named_parameters()}
    assert result.keys() == expected.keys()
    for name in expected:
        assert torch.equal(result[name], expected[name])


def test_wanda_matches_captured_inputs(model_and_data):
    model, forget, _ = model_and_data
    expected = H.wanda_reference(model, forget)
    result = scores(model, "wanda", {"calibration": forget})
    # only weights of linear layers get a wanda score
    assert set(result) == set(expected) == {n for n, m in H.linear_layers(model).items()}
    assert_close(result, expected)


def test_wanda_plain_linear_with_token_dimension():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    batches = [(torch.randn(2, 5, 6), torch.zeros(2, dtype=torch.long)) for _ in range(3)]
    tokens = torch.cat([x.reshape(-1, 6) for x, _ in batches])
    expected = model.weight.detach().abs() * tokens.norm(dim=0)[None, :]
    result = scores(model, "wanda", {"calibration": batches})
    assert set(result) == {"weight"}
    torch.testing.assert_close(result["weight"], expected, **TOL)


def test_wanda_gpt2_conv1d_excludes_padding():
    model = H.make_gpt2(seed=1)
    batches = H.token_batches(2, lengths=[7, 4, 1], vocab=50, seed=5)
    expected = H.wanda_reference(model, batches)
    result = scores(model, "wanda", {"calibration": batches})
    # Conv1D weights are [in, out]: the input norm runs along dim 0
    assert set(result) == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    }
    assert_close(result, expected, rtol=1e-5, atol=1e-6)
    with_padding = H.wanda_reference(model, batches, exclude_padding=False)
    assert all(not torch.allclose(with_padding[n], result[n]) for n in result), "padding tokens were counted"


def test_wanda_padded_batch_equals_unpadded_sequences():
    """Right padding + attention_mask gives the same statistics as feeding each sequence alone."""
    model = H.make_gpt2(seed=2)
    (batch,) = H.token_batches(1, lengths=[6, 3], vocab=50, seed=7)
    singles = [{"input_ids": batch["input_ids"][row : row + 1, :length]} for row, length in enumerate([6, 3])]
    padded = scores(model, "wanda", {"calibration": [batch]})
    alone = scores(model, "wanda", {"calibration": singles})
    assert_close(padded, alone, rtol=1e-4, atol=1e-6)


def test_wanda_needs_linear_weights():
    with pytest.raises(SafeEditError, match="linear"):
        scores(H.make_mlp(), "wanda", {"calibration": H.classification_batches(1)}, include=r"bias$")


def test_random_is_seeded_and_per_name():
    model = H.make_mlp()
    a = scores(model, "random", options={"seed": 7})
    b = scores(model, "random", options={"seed": 7})
    c = scores(model, "random", options={"seed": 8})
    default = scores(model, "random")
    only_one = scores(model, "random", include=r"^2\.weight$", options={"seed": 7})
    assert a.keys() == {n for n, _ in model.named_parameters()}
    for name in a:
        assert a[name].dtype == torch.float32 and a[name].shape == dict(model.named_parameters())[name].shape
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
        assert not torch.equal(a[name], default[name])
        assert ((a[name] >= 0) & (a[name] < 1)).all()
    assert torch.equal(only_one["2.weight"], a["2.weight"]), "depends on which other parameters are selected"
    # tensors of the same shape get different noise
    twin = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    twin_scores = scores(twin, "random", options={"seed": 1})
    assert not torch.equal(twin_scores["a.weight"], twin_scores["b.weight"])


def test_random_does_not_touch_global_rng():
    model = H.make_mlp()
    state = torch.random.get_rng_state()
    scores(model, "random", options={"seed": 3})
    assert torch.equal(torch.random.get_rng_state(), state)


def test_gpt2_saliency_counts_tied_weights_once_with_both_uses():
    model = H.make_gpt2(seed=4)
    batches = H.token_batches(2, lengths=[5, 3], vocab=50, seed=9)
    result = scores(model, "saliency", {"forget": batches})
    expected = {n: g.abs() for n, g in H.gradient_sum(model, batches).items()}
    assert "lm_head.weight" not in result  # tied to transformer.wte.weight, listed once
    assert_close(result, expected, rtol=1e-5, atol=1e-7)


def test_unreached_parameter_scores_zero():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(6, 3)
            self.unused = nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = WithUnused()
    batches = H.classification_batches(2)
    for score, data in [("saliency", {"forget": batches}), ("fisher", {"data": batches})]:
        result = scores(model, score, data)
        assert torch.equal(result["unused.weight"], torch.zeros(3, 6))
        assert result["used.weight"].abs().sum() > 0


# --- dtype, model state ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["saliency", "wagle", "fisher", "wanda", "magnitude", "random"])
def test_bfloat16_model_gives_fp32_scores(score):
    model = H.make_mlp(seed=5, dtype=torch.bfloat16)
    forget = H.classification_batches(3, seed=1, dtype=torch.bfloat16)
    retain = H.classification_batches(2, seed=2, dtype=torch.bfloat16)
    result = scores(model, score, data_for(score, forget, retain), options={"gamma": 2.0} if score == "wagle" else None)
    weights = {n: p.detach().float() for n, p in model.named_parameters()}
    for name, value in result.items():
        assert value.dtype == torch.float32, name
    if score == "saliency":
        expected = {n: g.abs() for n, g in H.gradient_sum(model, forget).items()}
    elif score == "wagle":
        g_f, g_r = H.gradient_sum(model, forget), H.gradient_sum(model, retain)
        expected = {n: ((weights[n] - g_r[n] / 2.0) * g_f[n]).abs() for n in g_f}
    elif score == "fisher":
        expected = H.squared_gradient_sum(model, forget)
    elif score == "wanda":
        expected = H.wanda_reference(model, forget)
    elif score == "magnitude":
        expected = {n: w.abs() for n, w in weights.items()}
    else:
        assert result.keys() == weights.keys()
        return
    # the per-batch bf16 gradients are the same; only their fp32 accumulation could differ
    assert_close(result, expected, rtol=1e-3, atol=1e-6)
    # and the accumulation really is fp32: a bf16 sum of the bf16 gradients would be coarser
    if score == "fisher":
        per_batch = H.per_batch_gradients(model, forget)
        bf16_sum = {n: sum(g[n].bfloat16().square() for g in per_batch).float() for n in per_batch[0]}
        assert any(not torch.equal(bf16_sum[n], result[n]) for n in result)


@pytest.mark.parametrize("score", ["saliency", "fisher"])
def test_bfloat16_gradients_add_into_fp32_one_tensor_at_a_time(score, monkeypatch):
    """A bf16 model's gradients are cast to fp32 per tensor (never a list of fp32 copies of all of them), and the
    sums are bit-identical to adding every batch's fp32-cast gradient in order."""
    model = H.make_llama(seed=2).to(torch.bfloat16)
    batches = H.token_batches(3, lengths=[6, 4], vocab=100, seed=5)
    fused_calls = []
    for name in ("_foreach_add_", "_foreach_addcmul_"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda s, *a, o=original: fused_calls.append(len(s)) or o(s, *a))
    result = scores(model, score, {"forget" if score == "saliency" else "data": batches})
    assert fused_calls == []  # no fp32 gradient on the fused path: every one was cast and added on its own
    expected = {n: torch.zeros_like(g) for n, g in result.items()}
    for grads in H.per_batch_gradients(model, batches):
        for n, g in grads.items():
            expected[n].add_(g) if score == "saliency" else expected[n].addcmul_(g, g)
    for name, value in expected.items():
        assert torch.equal(result[name], value.abs() if score == "saliency" else value), name


def test_fp32_model_keeps_the_fused_accumulation(monkeypatch):
    model = H.make_mlp(seed=4)
    fused_calls = []
    original = torch._foreach_addcmul_
    monkeypatch.setattr(torch, "_foreach_addcmul_", lambda s, *a: fused_calls.append(len(s)) or original(s, *a))
    scores(model, "fisher", {"data": H.classification_batches(2, seed=1)})
    assert fused_calls == [6, 6]  # one fused call per batch over all six parameters


@pytest.mark.parametrize("score", ["saliency", "wagle"])
def test_fp32_gradient_sums_accumulate_in_grad_bit_identically(score, monkeypatch):
    """On an fp32 model autograd sums the gradients in `param.grad`: no fp32 state set is allocated for a gradient
    sum (wagle holds one set, its forget sum, while the retain pass runs), and the scores are bit-identical to
    adding every batch's gradient into zeros in order."""
    model = H.make_llama(seed=6)
    forget = H.token_batches(3, lengths=[6, 4], vocab=100, seed=7)
    retain = H.token_batches(2, lengths=[5, 5], vocab=100, seed=8)
    from safeedit.attribution.statistics import GradientSum

    allocated = []
    original = GradientSum.init_states
    monkeypatch.setattr(GradientSum, "init_states", lambda self, *a: allocated.append(self.role) or original(self, *a))
    result = scores(model, score, data_for(score, forget, retain), options={"gamma": 3.0} if score == "wagle" else None)
    assert allocated == []

    def state_sum(batches):
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for grads in H.per_batch_gradients(model, batches):
            for n, g in grads.items():
                total[n].add_(g)
        return total

    g_f = state_sum(forget)
    if score == "saliency":
        expected = {n: g.abs() for n, g in g_f.items()}
    else:
        weights = dict(model.named_parameters())
        expected = {n: g_r.div(-3.0).add(weights[n].detach()).mul(g_f[n]).abs() for n, g_r in state_sum(retain).items()}
    for name, value in expected.items():
        assert torch.equal(result[name].view(torch.int32), value.view(torch.int32)), name
    assert all(p.grad is None for p in model.parameters())


def test_gradient_sums_keep_their_states_where_autograd_would_sum_differently(monkeypatch):
    """bf16 gradients (autograd would sum them in bf16), states kept elsewhere, or a role that also squares its
    gradients: the gradient sum gets its fp32 states."""
    from safeedit.attribution.statistics import GradientSum

    allocated = []
    original = GradientSum.init_states
    monkeypatch.setattr(GradientSum, "init_states", lambda self, *a: allocated.append(self.role) or original(self, *a))
    forget = H.classification_batches(2, seed=1, dtype=torch.bfloat16)
    scores(H.make_mlp(seed=1, dtype=torch.bfloat16), "saliency", {"forget": forget})
    assert allocated == ["forget"]
    scores(H.make_mlp(seed=1), "saliency", {"forget": H.classification_batches(2, seed=1)}, state_device="meta")
    assert allocated == ["forget", "forget"]


def test_a_sum_of_negative_zeros_reads_positive_zero_as_a_state_sum_does():
    from safeedit.attribution.stream import _take_grads

    param = nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([-0.0, 0.0, -2.5])
    taken = _take_grads({"p": param})["p"]
    assert taken.view(torch.int32).tolist() == torch.tensor([0.0, 0.0, -2.5]).view(torch.int32).tolist()
    assert param.grad is None


def test_language_model_loads_in_its_stored_dtype(tmp_path):
    from safeedit.models.language import load_language_model

    model = H.make_llama(seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    H.word_chat_tokenizer(["alpha", "beta"]).save_pretrained(tmp_path)
    default = load_language_model(str(tmp_path), progress=False).model
    stored = load_language_model(str(tmp_path), progress=False, dtype="stored").model
    assert {p.dtype for p in default.parameters()} == {torch.float32}  # unchanged default: fp32
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b.bfloat16()) for a, b in zip(stored.parameters(), default.parameters(), strict=True))
    with pytest.raises(SafeEditError, match="unknown model dtype 'bf16'"):
        load_language_model(str(tmp_path), progress=False, dtype="bf16")


@pytest.mark.parametrize("score", ["saliency", "wagle", "fisher", "wanda", "magnitude", "random"])
def test_model_left_exactly_as_found(score):
    model = H.make_cnn(seed=6).train()
    model[3].eval()  # a submodule in a different mode than its parent must keep it
    model[0].bias.requires_grad_(False)  # frozen but selected: gets scored, stays frozen
    model[5].weight.grad = torch.randn_like(model[5].weight)  # stale gradient: must be kept as is
    model[0].weight.grad = torch.randn_like(model[0].weight)
    forget = H.classification_batches(2, shape=(1, 6, 6), classes=4, seed=1)
    retain = H.classification_batches(2, shape=(1, 6, 6), classes=4, seed=2)
    before = H.snapshot(model)
    result = scores(model, score, data_for(score, forget, retain))
    H.assert_unchanged(model, before)
    if score == "saliency":
        # the stale .grad did not leak into the scores, and the frozen parameter got a real score
        expected = {n: g.abs() for n, g in H.gradient_sum(model, forget).items()}
        assert_close(result, expected)
        assert result["0.bias"].abs().sum() > 0


def test_model_left_as_found_after_an_error():
    model = H.make_cnn(seed=6).train()
    model[5].weight.grad = torch.randn_like(model[5].weight)
    before = H.snapshot(model)
    bad = [(torch.full((2, 1, 6, 6), float("nan")), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(SafeEditError, match="loss"):
        scores(model, "saliency", {"forget": bad})
    H.assert_unchanged(model, before)
    with pytest.raises(SafeEditError, match="empty"):
        scores(model, "fisher", {"data": []})
    H.assert_unchanged(model, before)


# --- parameter selection ----------------------------------------------------------------------------------------


def test_include_and_exclude_patterns():
    model = H.make_mlp()
    forget = H.classification_batches(2)
    full = scores(model, "saliency", {"forget": forget})
    cases = [
        ({"include": r"^0\."}, {"0.weight", "0.bias"}),
        ({"exclude": r"bias$"}, {"0.weight", "2.weight", "4.weight"}),
        ({"include": [r"^0\.", r"^4\."], "exclude": "bias"}, {"0.weight", "4.weight"}),
        ({"include": "weight", "exclude": [r"^0\.", r"^2\."]}, {"4.weight"}),
    ]
    for kwargs, names in cases:
        result = scores(model, "saliency", {"forget": forget}, **kwargs)
        assert set(result) == names, kwargs
        for name in names:  # selection does not change the gradients of what is selected
            torch.testing.assert_close(result[name], full[name], **TOL)


@pytest.mark.parametrize(
    "kwargs",
    [{"include": "attn"}, {"include": [r"^9\.", "nothing"]}, {"exclude": "."}, {"include": "0", "exclude": "0"}],
)
def test_patterns_matching_nothing_raise(kwargs):
    with pytest.raises(SafeEditError, match="match no parameter"):
        scores(H.make_mlp(), "magnitude", **kwargs)


def test_invalid_regex_raises():
    with pytest.raises(SafeEditError, match="regular expression"):
        scores(H.make_mlp(), "magnitude", include="(")


# --- errors -------------------------------------------------------------------------------------------------------


def test_unknown_score():
    with pytest.raises(SafeEditError, match=r"unknown score 'salency'.*saliency"):
        scores(H.make_mlp(), "salency", {"forget": H.classification_batches(1)})


def test_unknown_option_names_the_key():
    data = {"forget": H.classification_batches(1), "retain": H.classification_batches(1)}
    with pytest.raises(SafeEditError, match=r"gama.*gamma"):
        scores(H.make_mlp(), "wagle", data, options={"gama": 1})
    with pytest.raises(SafeEditError, match="seed"):
        scores(H.make_mlp(), "magnitude", options={"seed": 1})


@pytest.mark.parametrize("gamma", [0, -1.0, "abc"])
def test_bad_option_value(gamma):
    data = {"forget": H.classification_batches(1), "retain": H.classification_batches(1)}
    with pytest.raises(SafeEditError, match="gamma"):
        scores(H.make_mlp(), "wagle", data, options={"gamma": gamma})


def test_missing_and_unused_data_roles():
    batches = H.classification_batches(1)
    with pytest.raises(SafeEditError, match="retain"):
        scores(H.make_mlp(), "wagle", {"forget": batches})
    with pytest.raises(SafeEditError, match="forget"):
        scores(H.make_mlp(), "saliency", {"data": batches})
    with pytest.raises(SafeEditError, match="calibration"):
        scores(H.make_mlp(), "wanda")
    with pytest.raises(SafeEditError, match="retain"):
        scores(H.make_mlp(), "saliency", {"forget": batches, "retain": batches})
    with pytest.raises(SafeEditError, match="forget"):
        scores(H.make_mlp(), "magnitude", {"forget": batches})


@pytest.mark.parametrize(
    "score, data",
    [
        ("saliency", {"forget": []}),
        ("wagle", {"forget": "one", "retain": []}),
        ("fisher", {"data": iter([])}),
        ("wanda", {"calibration": []}),
    ],
)
def test_empty_loader_raises(score, data):
    data = {role: H.classification_batches(1) if batches == "one" else batches for role, batches in data.items()}
    with pytest.raises(SafeEditError, match="empty"):
        scores(H.make_mlp(), score, data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("score", ["saliency", "magnitude"])
def test_non_finite_weights_raise(score, bad):
    model = H.make_mlp()
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    data = {"forget": H.classification_batches(1)} if score == "saliency" else None
    with pytest.raises(SafeEditError, match=r"'2\.weight'.*NaN"):
        scores(model, score, data)


# --- a tiny Hugging Face causal LM end to end ----------------------------------------------------------------------


def test_llama_saliency_and_exact_top_k():
    model = H.make_llama(seed=0)
    batches = H.token_batches(3, lengths=[8, 5], vocab=100, seed=11)
    result = scores(model, "saliency", {"forget": batches})
    expected = {n: g.abs() for n, g in H.gradient_sum(model, batches).items()}
    assert_close(result, expected, rtol=1e-5, atol=1e-7)

    total = sum(t.numel() for t in result.values())
    ratio = 0.013
    mask = Mask.top_k(result, ratio)
    assert mask.selected == target_count(ratio, total) == round(ratio * total)
    assert set(mask.tensors) == set(result)
    chosen = torch.cat([result[n][mask.tensors[n]] for n in result])
    rest = torch.cat([result[n][~mask.tensors[n]] for n in result])
    assert chosen.min() >= rest.max()


# --- what a loader may be --------------------------------------------------------------------------------------------


def test_generator_and_map_style_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    model = H.make_mlp()
    batches = H.classification_batches(3, seed=4)
    expected = scores(model, "fisher", {"data": batches})
    assert_close(scores(model, "fisher", {"data": (b for b in batches)}), expected)
    dataset = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    assert_close(scores(model, "fisher", {"data": DataLoader(dataset, batch_size=4)}), expected)


def test_dataloader_over_iterable_dataset():
    """A DataLoader over an IterableDataset (streaming data) has a __len__ that raises TypeError."""
    from torch.utils.data import DataLoader

    model = H.make_mlp()
    batches = H.classification_batches(3, seed=4)
    inputs, targets = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    loader = DataLoader(H._Stream(inputs, targets), batch_size=4)
    assert_close(scores(model, "fisher", {"data": loader}), scores(model, "fisher", {"data": batches}))
