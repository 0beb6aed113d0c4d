"""The unlearning loop's large-model options (gradient accumulation, checkpointing, bf16 autocast, editing in place)
and what it pays for: optimizer state only for masked-in tensors, masked-out weights bit-identical throughout."""

from __future__ import annotations

import copy
import itertools

import helpers as H
import pytest
import torch
import torch.nn.functional as F
from test_wagle import FORGET, RETAIN, llama, tokenizer
from torch import nn

from safeedit import Mask
from safeedit.errors import SafeEditError
from safeedit.unlearn.loop import TrainingOptions, unlearn
from safeedit.unlearn.masked import MaskedTraining
from safeedit.unlearn.objectives import Phase
from safeedit.unlearn.wagle import LMUnlearnOptions, lm_unlearn


def mlp_task(n_batches: int = 5, seed: int = 0):
    """The tiny MLP of the helpers, a mask with one tensor all out and one without entry, and 4-example batches."""
    model = H.make_mlp(seed)
    generator = torch.Generator().manual_seed(seed)
    mask = Mask({"0.weight": torch.rand(8, 6, generator=generator) < 0.5,
                 "0.bias": torch.zeros(8, dtype=torch.bool),
                 "2.weight": torch.rand(5, 8, generator=generator) < 0.5,
                 "4.weight": torch.ones(3, 5, dtype=torch.bool)})
    batches = [(torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(n_batches)]
    return model, mask, batches


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def objective(batches):
    return lambda epoch: [Phase("train", batches, cross_entropy)]


def assert_masked_out_identical(before: nn.Module, after: nn.Module, mask: Mask) -> None:
    for name, p in after.named_parameters():
        keep = mask.tensors.get(name, torch.zeros(p.shape, dtype=torch.bool))
        start = dict(before.named_parameters())[name].detach()
        assert torch.equal(p.detach()[~keep], start[~keep]), f"masked-out entries of {name} changed"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_accumulated_sgd_equals_hand_computation(k):
    """Plain SGD with k micro-batches per step: each step moves masked-in weights by −lr · mean of the step's
    micro-batch gradients, masked (a phase of 5 batches: steps of k, the last takes what is left)."""
    model, mask, batches = mlp_task()
    lr = 0.1
    options = TrainingOptions(epochs=1, lr=lr, momentum=0, weight_decay=0, optimizer="sgd",
                              gradient_accumulation_steps=k)
    edited = unlearn(model, objective(batches), options, mask, progress=False)

    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    for start in range(0, len(batches), k):
        step = batches[start:start + k]
        grads = torch.autograd.grad(sum(cross_entropy(reference, b) for b in step) / len(step), list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads, strict=True):
                p -= lr * g * mask.tensors.get(name, torch.zeros_like(p, dtype=torch.bool))
    for name, p in edited.named_parameters():
        torch.testing.assert_close(p.detach(), params[name].detach(), rtol=1e-6, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert_masked_out_identical(model, edited, mask)


def test_optimizer_state_only_for_masked_in_tensors(monkeypatch):
    """AdamW (weight decay, so masked-out weights would move without the restore) holds the tensors with a masked-in
    entry, and only they get state; masked-out weights stay bit-identical, masked-in ones move."""
    created = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    model, mask, batches = mlp_task()
    edited = unlearn(model, objective(batches), TrainingOptions(epochs=2, lr=0.05, weight_decay=0.1, optimizer="adam"),
                     mask, progress=False)
    (optimizer,) = created
    names = {id(p): name for name, p in edited.named_parameters()}
    held = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    assert held == {"0.weight", "2.weight", "4.weight"}  # not 0.bias (all out), nor the biases without entry
    assert {names[id(p)] for p in optimizer.state} == held
    assert_masked_out_identical(model, edited, mask)
    for name in held:
        assert not torch.equal(dict(edited.named_parameters())[name], dict(model.named_parameters())[name]), name


def test_in_place_edits_the_model_itself_as_the_copy_would_be():
    model, mask, batches = mlp_task()
    options = TrainingOptions(epochs=2, lr=0.05, weight_decay=1e-2)
    copied = unlearn(model, objective(batches), options, mask, progress=False)
    original = copy.deepcopy(model)
    edited = unlearn(model, objective(batches), options, mask, progress=False, in_place=True)
    assert edited is model
    for (name, a), b in zip(copied.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert b.grad is None and b.requires_grad, name
    assert_masked_out_identical(original, model, mask)


def test_bf16_runs_forward_passes_under_autocast():
    model, mask, batches = mlp_task()
    seen = []

    def loss(module, batch):
        logits = module(batch[0])
        seen.append(logits.dtype)
        return F.cross_entropy(logits.float(), batch[1])

    options = TrainingOptions(epochs=1, lr=0.05, weight_decay=0.1, mixed_precision="bf16")
    edited = unlearn(model, lambda epoch: [Phase("train", batches, loss)], options, mask, progress=False)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in edited.parameters())
    assert_masked_out_identical(model, edited, mask)


def test_gradient_checkpointing_saves_fewer_activations_and_leaves_the_result_and_the_model_as_they_were():
    """Checkpointed, the forward keeps a fraction of the activations (the rest is recomputed in backward); the
    weights after equal the plain run's, and checkpointing is off again on the model edited in place."""
    batches = H.token_batches(3, [6, 4], vocab=100, seed=1)
    options = TrainingOptions(epochs=1, lr=1e-2, optimizer="adam")
    results, saved = [], []
    for checkpointing in (False, True):
        packed = [0]

        def loss(model, batch, packed=packed):
            def pack(tensor):
                packed[0] += 1
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                return model(**batch).loss

        model = llama()
        objective = lambda epoch: [Phase("train", batches, loss)]  # noqa: E731
        results.append(unlearn(model, objective, options.model_copy(update={"gradient_checkpointing": checkpointing}),
                               progress=False, in_place=True))
        assert not model.is_gradient_checkpointing
        saved.append(packed[0])
    assert saved[1] < saved[0] / 2
    for (name, a), b in zip(results[0].named_parameters(), results[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_gradient_checkpointing_on_a_plain_module_fails_with_one_line():
    model, mask, batches = mlp_task()
    with pytest.raises(SafeEditError, match=r"gradient_checkpointing needs a Hugging Face .*; Sequential does not"):
        unlearn(model, objective(batches), TrainingOptions(gradient_checkpointing=True), mask, progress=False)


@pytest.mark.parametrize("k, checkpointing, precision",
                         list(itertools.product([1, 2], [False, True], ["no", "bf16"])))
def test_every_option_combination_keeps_masked_out_weights_bit_identical(k, checkpointing, precision):
    model = llama()
    options = LMUnlearnOptions(epochs=1, lr=1e-2, batch_size=1, ratio=0.2, gradient_accumulation_steps=k,
                               gradient_checkpointing=checkpointing, mixed_precision=precision)
    edited, mask = lm_unlearn(model, tokenizer(), FORGET, RETAIN, "graddiff+random", options, progress=False)
    assert_masked_out_identical(model, edited, mask)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), edited.parameters(), strict=True))


def test_in_place_npo_needs_a_reference_and_with_one_equals_the_copy():
    tok, options = tokenizer(), LMUnlearnOptions(epochs=1, lr=1e-2, batch_size=2, ratio=0.3)
    with pytest.raises(SafeEditError, match=r"npo compares against the frozen original.*reference="):
        lm_unlearn(llama(), tok, FORGET, RETAIN, "npo+wagle", options, progress=False, in_place=True)
    with pytest.raises(SafeEditError, match="reference= is for in_place=True"):
        lm_unlearn(llama(), tok, FORGET, RETAIN, "npo", options, progress=False, reference=llama())
    copied, copied_mask = lm_unlearn(llama(), tok, FORGET, RETAIN, "npo+wagle", options, progress=False)
    model = llama()
    edited, mask = lm_unlearn(model, tok, FORGET, RETAIN, "npo+wagle", options, progress=False, in_place=True,
                              reference=llama())
    assert edited is model
    for name, keep in copied_mask.tensors.items():
        assert torch.equal(mask.tensors[name], keep), name
    for (name, a), b in zip(copied.named_parameters(), edited.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer, momentum", [("adam", 0.0), ("sgd", 0.9)])
def test_without_weight_decay_no_write_back_and_the_same_result_as_restoring_after_every_step(
        optimizer, momentum, monkeypatch):
    """Weight decay 0 (LLM unlearning's AdamW): no write-back after the steps, masked-out weights already
    bit-identical before the final one on exit, and every weight bit-identical to the run restoring after every
    step (clipping and accumulation on)."""
    options = TrainingOptions(epochs=2, lr=0.05, momentum=momentum, weight_decay=0.0, optimizer=optimizer,
                              grad_clip=0.5, gradient_accumulation_steps=2)
    model, mask, batches = mlp_task()
    original = MaskedTraining.restore_after_steps_of
    monkeypatch.setattr(MaskedTraining, "restore_after_steps_of",
                        lambda self, opt, every_step=False: original(self, opt, every_step=True))
    reference = unlearn(model, objective(batches), options, mask, progress=False)
    monkeypatch.setattr(MaskedTraining, "restore_after_steps_of", original)

    written, close = [], MaskedTraining.close
    restore = MaskedTraining.restore

    def spy_restore(self, names=None):
        written.extend(names or [])
        restore(self, names)

    def check_then_close(self):
        assert_masked_out_identical(model, self.model, mask)  # before the exit's write-back
        close(self)

    monkeypatch.setattr(MaskedTraining, "restore", spy_restore)
    monkeypatch.setattr(MaskedTraining, "close", check_then_close)
    edited = unlearn(model, objective(batches), options, mask, progress=False)
    assert written == []
    for (name, a), b in zip(reference.named_parameters(), edited.parameters(), strict=True):
        assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32)), name
    assert not torch.equal(reference.get_parameter("2.weight"), model.get_parameter("2.weight"))
