"""Masked training: masked-out weights stay bit-identical under any optimizer; masked-in ones train as usual."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import clip_grad_norm_

from safeedit import Mask, SafeEditError, masked_training
from safeedit.unlearn.masked import MaskedTraining, bits

NO_ENTRY = ("1.bias", "3.bias")  # parameters the mask does not mention: frozen
ALL_OUT = "1.weight"  # a mask entry that is all False: frozen too


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()


def make_mask(seed: int = 0) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    return Mask(
        {
            "0.weight": torch.rand(8, 6, generator=generator) < 0.5,
            "0.bias": torch.rand(8, generator=generator) < 0.5,
            ALL_OUT: torch.zeros(8, dtype=torch.bool),
            "3.weight": torch.rand(3, 8, generator=generator) < 0.5,
        }
    )


def make_batches(n: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)) for _ in range(n)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def loss_of(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def assert_masked_out_identical(before, after, mask: Mask) -> None:
    for name in before:
        keep = mask.tensors.get(name)
        if keep is None:
            assert torch.equal(after[name], before[name]), f"{name} (no mask entry) changed"
        else:
            assert torch.equal(after[name][~keep], before[name][~keep]), f"masked-out entries of {name} changed"


def assert_masked_in_changed(before, after, mask: Mask) -> None:
    for name, keep in mask.tensors.items():
        if keep.any():
            changed = after[name][keep] != before[name][keep]
            assert changed.all(), f"{int((~changed).sum())} masked-in entries of {name} did not move"


OPTIMIZERS = {
    "adamw_wd": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam_coupled_wd": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.05),
    "rmsprop_momentum": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5, weight_decay=0.01),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2, weight_decay=0.01),
}


def train(model, mask, optimizer, batches, steps=20, clip=None, buffers="update"):
    with masked_training(model, mask, optimizer, buffers=buffers):
        for step in range(steps):
            optimizer.zero_grad()
            loss_of(model, batches[step % len(batches)]).backward()
            if clip is not None:
                clip_grad_norm_(model.parameters(), clip)
            optimizer.step()


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_out_weights_bit_identical(name, clip):
    model, mask, batches = make_model(), make_mask(), make_batches()
    optimizer = OPTIMIZERS[name](model.parameters())  # all parameters, frozen ones included
    before = weights(model)
    train(model, mask, optimizer, batches, steps=20, clip=clip)
    after = weights(model)
    assert_masked_out_identical(before, after, mask)
    assert_masked_in_changed(before, after, mask)


def test_stale_optimizer_state_cannot_move_masked_out_weights():
    """Momentum built up before the block (and a leftover .grad) must not leak into masked-out weights."""
    model, mask, batches = make_model(), make_mask(), make_batches()
    for make in (OPTIMIZERS["adamw_wd"], OPTIMIZERS["sgd_momentum_wd"]):
        optimizer = make(model.parameters())
        for batch in batches:  # unmasked warm-up: every parameter gets optimizer state
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()
        loss_of(model, batches[0]).backward()  # a stale gradient left on the parameters
        before = weights(model)
        with masked_training(model, mask, optimizer):
            for param in model.parameters():
                assert param.grad is None
            for _ in range(3):
                optimizer.step()  # no new gradient: only stale state and weight decay could act
            optimizer.zero_grad()
            loss_of(model, batches[1]).backward()
            optimizer.step()
        assert_masked_out_identical(before, weights(model), mask)


def test_gradients_inside_the_block_are_masked():
    model, mask, batches = make_model(), make_mask(), make_batches()
    with masked_training(model, mask):
        loss_of(model, batches[0]).backward()
        params = dict(model.named_parameters())
        for name, param in params.items():
            keep = mask.tensors.get(name)
            if keep is None or not keep.any():
                assert not param.requires_grad and param.grad is None, name
            else:
                assert param.requires_grad
                assert (param.grad[~keep] == 0).all(), name
                assert (param.grad[keep] != 0).any(), name


def test_clipping_sees_only_masked_gradients():
    model, mask, batches = make_model(), make_mask(), make_batches()
    reference = copy.deepcopy(model)
    loss_of(reference, batches[0]).backward()  # unmasked
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    masked_grads = {n: ref_grads[n] * keep for n, keep in mask.tensors.items() if keep.any()}
    hand_norm = torch.sqrt(sum(g.square().sum() for g in masked_grads.values()))
    unmasked_norm = torch.sqrt(sum(g.square().sum() for g in ref_grads.values()))
    assert not torch.allclose(hand_norm, unmasked_norm, rtol=1e-3)

    max_norm = 1e-3
    with masked_training(model, mask):
        loss_of(model, batches[0]).backward()
        total = clip_grad_norm_(model.parameters(), max_norm)
        torch.testing.assert_close(total, hand_norm, rtol=1e-5, atol=0)
        scale = max_norm / (hand_norm + 1e-6)
        for name, param in model.named_parameters():
            if name in masked_grads:
                torch.testing.assert_close(param.grad, masked_grads[name] * scale, rtol=1e-5, atol=1e-9)


def test_masked_sgd_equals_manual_update_with_masked_gradient():
    lr, steps = 0.1, 12
    model, mask, batches = make_model(), make_mask(), make_batches()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train(model, mask, optimizer, batches, steps=steps)

    for step in range(steps):
        reference.zero_grad()
        loss_of(reference, batches[step % len(batches)]).backward()
        with torch.no_grad():
            for name, param in reference.named_parameters():
                keep = mask.tensors.get(name)
                if keep is not None:
                    param.add_(param.grad * keep, alpha=-lr)
    for (name, got), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_masked_adamw_first_step_equals_unmasked_step_on_masked_in_entries():
    """AdamW is element-wise: on the first step the masked-in entries move exactly as without a mask."""
    model, mask, batches = make_model(), make_mask(), make_batches()
    reference = copy.deepcopy(model)
    train(model, mask, OPTIMIZERS["adamw_wd"](model.parameters()), batches, steps=1)
    ref_optimizer = OPTIMIZERS["adamw_wd"](reference.parameters())
    loss_of(reference, batches[0]).backward()
    ref_optimizer.step()
    got, expected = weights(model), weights(reference)
    for name, keep in mask.tensors.items():
        torch.testing.assert_close(got[name][keep], expected[name][keep], rtol=1e-6, atol=0)


def test_requires_grad_restored_and_frozen_inside():
    model, mask = make_model(), make_mask()
    model[3].bias.requires_grad_(False)
    model[0].bias.requires_grad_(False)  # frozen by the user but in the mask: trainable inside, frozen after
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with masked_training(model, mask) as masked:
        inside = {n: p.requires_grad for n, p in model.named_parameters()}
        assert inside == {
            "0.weight": True,
            "0.bias": True,
            "1.weight": False,
            "1.bias": False,
            "3.weight": True,
            "3.bias": False,
        }
        assert {id(p) for p in masked.trainable_parameters} == {
            id(model[0].weight),
            id(model[0].bias),
            id(model[3].weight),
        }
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_exit_after_exception_restores_weights_and_flags():
    model, mask, batches = make_model(), make_mask(), make_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = weights(model)
    with pytest.raises(RuntimeError, match="boom"), masked_training(model, mask, optimizer):
        loss_of(model, batches[0]).backward()
        optimizer.step()
        raise RuntimeError("boom")
    assert_masked_out_identical(before, weights(model), mask)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    loss_of(model, batches[1]).backward()  # hooks removed: gradients are no longer masked
    assert (model[0].weight.grad[~mask.tensors["0.weight"]] != 0).any()


def test_without_optimizer_restore_is_manual():
    model, mask, batches = make_model(), make_mask(), make_batches()
    optimizer = OPTIMIZERS["adamw_wd"](model.parameters())
    before = weights(model)
    with masked_training(model, mask) as masked:
        for batch in batches:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()
            masked.restore()
            assert_masked_out_identical(before, weights(model), mask)
    assert_masked_in_changed(before, weights(model), mask)


def test_buffers_freeze_keeps_running_stats_and_update_changes_them():
    for buffers in ("freeze", "update"):
        model, mask, batches = make_model(), make_mask(), make_batches()
        stats = {k: v.clone() for k, v in model[1].state_dict().items() if k.startswith("running")}
        optimizer = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
        train(model, mask, optimizer, batches, steps=5, buffers=buffers)
        for key, value in stats.items():
            same = torch.equal(getattr(model[1], key), value)
            assert same == (buffers == "freeze"), (buffers, key)


def test_buffers_freeze_restores_after_every_step():
    model, mask, batches = make_model(), make_mask(), make_batches()
    stats = {k: v.clone() for k, v in model[1].state_dict().items() if k.startswith("running")}
    optimizer = OPTIMIZERS["adamw_wd"](model.parameters())
    with masked_training(model, mask, optimizer, buffers="freeze"):
        for batch in batches[:3]:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            assert not torch.equal(model[1].running_mean, stats["running_mean"])  # forward moved them...
            optimizer.step()
            for key, value in stats.items():  # ...and the step hook put them back
                assert torch.equal(getattr(model[1], key), value), key


def test_buffers_freeze_leaves_every_buffer_untouched():
    """'freeze' is for edits that must not touch anything outside the mask: the whole buffer state, including
    BatchNorm's integer num_batches_tracked counter (used for the running average when momentum=None)."""
    model, mask, batches = make_model(), make_mask(), make_batches()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    train(model, mask, OPTIMIZERS["adamw_wd"](model.parameters()), batches, steps=5, buffers="freeze")
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"buffer {name} changed: {buffers[name]} -> {value}"


def test_bad_mask_or_buffers_argument():
    model = make_model()
    with pytest.raises(SafeEditError, match="shape"):
        masked_training(model, Mask({"0.weight": torch.ones(6, 8, dtype=torch.bool)})).__enter__()
    with pytest.raises(SafeEditError, match="names no parameter"):
        masked_training(model, Mask({"9.weight": torch.ones(6, 8, dtype=torch.bool)})).__enter__()
    with pytest.raises(ValueError, match="buffers"):
        masked_training(model, make_mask(), buffers="keep").__enter__()
    assert all(p.requires_grad for p in model.parameters())


# --- negative controls: what the guarantee protects against ---------------------------------------------------------


def test_negative_control_zeroed_gradients_do_not_protect_against_weight_decay():
    """The SalUn/WAGLE bug: zeroing masked-out gradients by hand, AdamW's decoupled decay still moves them."""
    model, mask, batches = make_model(), make_mask(), make_batches()
    optimizer = OPTIMIZERS["adamw_wd"](model.parameters())
    before = weights(model)
    for step in range(5):
        optimizer.zero_grad()
        loss_of(model, batches[step]).backward()
        for name, param in model.named_parameters():
            keep = mask.tensors.get(name)
            param.grad = param.grad * keep if keep is not None else torch.zeros_like(param.grad)
        optimizer.step()
    after = weights(model)
    for name, keep in mask.tensors.items():
        if (~keep).any():
            assert (after[name][~keep] != before[name][~keep]).all(), name


def test_negative_control_gradient_hooks_alone_are_not_enough():
    """Inside the block but with no optimizer and no restore(), weight decay moves masked-out weights; this is
    why the step post-hook exists."""
    model, mask, batches = make_model(), make_mask(), make_batches()
    optimizer = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    with masked_training(model, mask):
        before = weights(model)
        for batch in batches:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()
        inside = weights(model)
    assert (inside["0.weight"][~mask.tensors["0.weight"]] != before["0.weight"][~mask.tensors["0.weight"]]).all()
    # and the final restore on exit still puts them back
    assert_masked_out_identical(before, weights(model), mask)


def test_masked_out_gradient_entries_are_exactly_zero_even_when_not_finite():
    """The gradient is masked on its bits: a NaN or infinite entry outside the mask becomes +0.0 (multiplying the
    float by 0 would leave NaN), so clipping sees a finite norm; masked-in entries are untouched, bit for bit."""
    weight = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    model = nn.ParameterDict({"w": weight})
    keep = torch.tensor([[True, False, True, False]])
    factor = torch.tensor([[0.5, float("nan"), -0.25, float("inf")]])
    with masked_training(model, Mask({"w": keep})):
        (weight * factor).sum().backward()
        grad = weight.grad
        assert torch.equal(grad, torch.tensor([[0.5, 0.0, -0.25, 0.0]]))
        assert not torch.signbit(grad[~keep]).any()
        assert torch.isfinite(clip_grad_norm_(model.parameters(), 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_masked_out_weights_bit_identical_in_every_float_dtype(dtype):
    """The bit arithmetic of the gradient mask and the restore takes the element size of each dtype."""
    model, mask, batches = make_model(), make_mask(), make_batches()
    model = model.to(dtype)
    before = weights(model)
    optimizer = OPTIMIZERS["adamw_wd"](model.parameters())
    with masked_training(model, mask, optimizer):
        for batch in batches:
            optimizer.zero_grad()
            loss_of(model, (batch[0].to(dtype), batch[1])).backward()
            optimizer.step()
    after = weights(model)
    assert_masked_out_identical(before, after, mask)
    assert_masked_in_changed(before, after, mask)


# --- the per-step restore is skipped only where the step provably cannot move masked-out weights --------------------

NAN_PAYLOAD = torch.tensor([0x7FC12345], dtype=torch.int32).view(torch.float32).item()  # a quiet NaN, own payload

EXACT = {  # weight decay 0, state empty on entry: the step leaves masked-out entries (gradient +0.0) bit for bit
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adam_foreach_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True, foreach=True),
    "adam_fused_maximize": lambda params: torch.optim.Adam(params, lr=1e-2, maximize=True, fused=True),
    "adamw_maximize_amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, maximize=True,
                                                               amsgrad=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "sgd_momentum_dampening": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, dampening=0.5),
    "sgd_nesterov_foreach": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "sgd_momentum_fused": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
}

MOVABLE = {  # a step may move masked-out weights: written back after every one
    "adamw_wd": OPTIMIZERS["adamw_wd"],
    "adam_coupled_wd": OPTIMIZERS["adam_coupled_wd"],
    "sgd_salun_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_maximize": lambda params: torch.optim.SGD(params, lr=0.05, maximize=True),
    "adam_maximize_beta1_0": lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.0, 0.9), maximize=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
    "adam_subclass": lambda params: type("MyAdam", (torch.optim.Adam,), {})(params, lr=1e-2),
}


def tricky_model(device: str = "cpu") -> tuple[nn.ParameterDict, Mask, list[torch.Tensor]]:
    """An embedding table and a projection; rows 6-9 of the table are never looked up, so their masked-out entries
    can hold NaN (with a payload) and infinities without touching the loss; -0.0 and +0.0 sit in used rows (with
    non-zero raw gradients) and in the projection."""
    torch.manual_seed(0)
    table, proj = torch.randn(10, 4), torch.randn(4, 3)
    generator = torch.Generator().manual_seed(1)
    keep_table, keep_proj = torch.rand(10, 4, generator=generator) < 0.5, torch.rand(4, 3, generator=generator) < 0.5
    keep_table[6:] = torch.tensor([True, False, False, False])
    table[6:, 1:] = torch.tensor([[NAN_PAYLOAD, float("inf"), float("-inf")], [-0.0, 0.0, float("nan")],
                                  [-0.0, -0.0, 1.0], [0.0, -0.0, float("-inf")]])
    table[:6][~keep_table[:6]] = torch.tensor([-0.0, 0.0]).repeat(12)[: int((~keep_table[:6]).sum())]
    proj[~keep_proj] = -0.0
    model = nn.ParameterDict({"table": nn.Parameter(table), "proj": nn.Parameter(proj)}).to(device)
    ids = [torch.randint(0, 6, (8,), generator=generator).to(device) for _ in range(4)]
    return model, Mask({"table": keep_table, "proj": keep_proj}).to(device), ids


def tricky_loss(model: nn.ParameterDict, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.embedding(ids, model["table"]) @ model["proj"], ids % 3)


def bit_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: bits(p.detach()).clone() for n, p in model.named_parameters()}


def restored_names(monkeypatch) -> list[list[str]]:
    """The names each step's write-back covers (calls of `restore` with names, i.e. from the step hook)."""
    calls = []
    original = MaskedTraining.restore

    def spy(self, names=None):
        if names is not None:
            calls.append(sorted(names))
        return original(self, names)

    monkeypatch.setattr(MaskedTraining, "restore", spy)
    return calls


def train_tricky(make, every_step=False, steps=8, clip=None, check=None, device="cpu"):
    model, mask, ids = tricky_model(device)
    optimizer = make(model.parameters())
    with masked_training(model, mask, optimizer, every_step=every_step):
        for step in range(steps):
            optimizer.zero_grad()
            tricky_loss(model, ids[step % len(ids)]).backward()
            if clip is not None:
                clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if check is not None:
                check(model, mask)
    return model, mask


@pytest.mark.parametrize("name", sorted(EXACT))
def test_restore_skipped_where_the_step_cannot_move_masked_out_weights(name, monkeypatch, device="cpu"):
    """No write-back after any step, and still every masked-out weight (-0.0, +0.0, NaN with payload, +-inf) is
    bit-identical after every step; masked-in weights move; the result equals the run restoring after every step."""
    reference, _ = train_tricky(EXACT[name], every_step=True, clip=0.5, device=device)
    calls = restored_names(monkeypatch)
    start, mask, _ = tricky_model(device)
    before = bit_weights(start)
    checks = []

    def check(model, mask):
        for n, p in model.named_parameters():
            out = ~mask.tensors[n]
            assert torch.equal(bits(p.detach())[out], before[n][out]), f"step {len(checks)}: masked-out {n} moved"
        checks.append(True)

    model, _ = train_tricky(EXACT[name], clip=0.5, check=check, device=device)
    assert len(checks) == 8 and calls == [[]] * 8  # eight steps, no write-back after any
    for n, p in model.named_parameters():
        assert torch.equal(bits(p.detach()), bits(reference.get_parameter(n).detach())), n
        moved = p.detach()[mask.tensors[n]] != start.get_parameter(n).detach()[mask.tensors[n]]
        assert moved.any(), n


@pytest.mark.parametrize("name", sorted(MOVABLE))
def test_restore_after_every_step_where_the_step_may_move_masked_out_weights(name, monkeypatch):
    calls = restored_names(monkeypatch)
    model, mask = train_tricky(MOVABLE[name], steps=4)
    assert calls == [["proj", "table"]] * 4
    start = bit_weights(tricky_model()[0])
    for n, p in model.named_parameters():
        out = ~mask.tensors[n]
        assert torch.equal(bits(p.detach())[out], start[n][out]), n


def test_every_step_restores_after_every_step(monkeypatch):
    calls = restored_names(monkeypatch)
    train_tricky(EXACT["adam"], every_step=True, steps=3)
    assert calls == [["proj", "table"]] * 3


def test_negative_control_sgd_maximize_turns_a_negative_zero_weight_positive():
    """Why SGD's maximize keeps the write-back: a -0.0 weight with gradient +0.0 comes out +0.0; without maximize
    it stays -0.0."""
    for maximize, sign in ((True, False), (False, True)):
        weight = nn.Parameter(torch.tensor([-0.0]))
        weight.grad = torch.tensor([0.0])
        torch.optim.SGD([weight], lr=0.1, maximize=maximize).step()
        assert bool(torch.signbit(weight.detach())) is sign


def test_write_back_resumes_for_good_once_a_step_may_move_masked_out_weights(monkeypatch):
    """A gradient assigned by hand (not the one the mask zeroed), weight decay switched on, or the optimizer's state
    replaced: from that step on, the masked-out weights are written back after every step."""
    calls = restored_names(monkeypatch)
    start = bit_weights(tricky_model()[0])

    def run(tamper):
        calls.clear()
        model, mask, ids = tricky_model()
        optimizer = EXACT["adam"](model.parameters())
        with masked_training(model, mask, optimizer):
            for step in range(4):
                optimizer.zero_grad()
                tricky_loss(model, ids[step]).backward()
                if step == 1:
                    tamper(model, optimizer)
                optimizer.step()
                for n, p in model.named_parameters():
                    out = ~mask.tensors[n]
                    assert torch.equal(bits(p.detach())[out], start[n][out]), (step, n)
        return calls

    def by_hand(model, optimizer):
        model["proj"].grad = torch.ones_like(model["proj"])  # masked-out entries too

    def decay(model, optimizer):
        optimizer.param_groups[0]["weight_decay"] = 0.1

    def reload(model, optimizer):
        optimizer.load_state_dict(optimizer.state_dict())

    assert run(by_hand) == [[], ["proj"], ["proj"], ["proj"]]
    assert run(decay) == [[], ["proj", "table"], ["proj", "table"], ["proj", "table"]]
    assert run(reload) == [[], ["proj", "table"], ["proj", "table"], ["proj", "table"]]


def test_state_from_before_the_block_keeps_the_write_back(monkeypatch):
    """Adam without weight decay but with moments built before the block moves masked-out weights: written back."""
    model, mask, ids = tricky_model()
    optimizer = EXACT["adam"](model.parameters())
    tricky_loss(model, ids[0]).backward()
    optimizer.step()
    calls = restored_names(monkeypatch)
    before = bit_weights(model)
    with masked_training(model, mask, optimizer):
        for step in range(2):
            optimizer.zero_grad()
            tricky_loss(model, ids[step]).backward()
            optimizer.step()
            for n, p in model.named_parameters():
                out = ~mask.tensors[n]
                assert torch.equal(bits(p.detach())[out], before[n][out]), (step, n)
    assert calls == [["proj", "table"]] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_write_back_equals_the_weight_bits_times_the_mask_or_the_saved_bits(dtype):
    """The one-pass write-back (saved bits + weight bits times the mask) gives the bits of the former two-pass one
    (weight bits times the mask, or-ed with the saved bits), on arbitrary bit patterns (NaNs, infinities, -0.0)."""
    generator = torch.Generator().manual_seed(3)
    integer = bits(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(integer)

    def random_bits() -> torch.Tensor:
        return torch.randint(info.min, info.max, (64, 33), generator=generator, dtype=torch.int64).to(integer)

    start = random_bits()
    model = nn.ParameterDict({"w": nn.Parameter(start.clone().view(dtype))})
    keep = torch.rand(64, 33, generator=generator) < 0.5
    with masked_training(model, Mask({"w": keep})) as session:
        moved = random_bits()
        bits(model["w"].detach()).copy_(moved)
        session.restore()
        expected = (moved * keep) | start.masked_fill(keep, 0)
        assert torch.equal(bits(model["w"].detach()), expected)
