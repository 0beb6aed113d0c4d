"""The driver: stream each data role through the model once and turn the accumulated statistics into scores."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from safeedit.attribution.distributed import lockstep, shard_batches
from safeedit.attribution.params import select_parameters
from safeedit.attribution.registry import get_score
from safeedit.attribution.statistics import BatchContext, Statistic, Tensors
from safeedit.batches import default_forward, default_loss, to_device
from safeedit.errors import SafeEditError
from safeedit.progress import bars_off
from safeedit.sharding import (
    Shards,
    all_reduce_sum,
    found_anywhere,
    is_sharded,
    local,
    rank_and_world,
    replicate_like,
    shard_like,
    wrap_like,
)

LossFunction = Callable[[nn.Module, Any], torch.Tensor]


@contextlib.contextmanager
def attribution_mode(model: nn.Module, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode, gradients only for `params`, and the model's own state (modes, requires_grad, .grad) restored."""
    training = {module: module.training for module in model.modules()}
    all_params = dict(model.named_parameters())
    requires = {name: p.requires_grad for name, p in all_params.items()}
    grads = {name: p.grad for name, p in all_params.items()}
    try:
        model.eval()
        for name, p in all_params.items():
            p.requires_grad_(name in params)
            p.grad = None
        yield
    finally:
        for module, was_training in training.items():
            module.train(was_training)
        for name, p in all_params.items():
            p.requires_grad_(requires[name])
            p.grad = grads[name]


def _progress(batches: Iterable, description: str, show: bool) -> Iterable:
    try:
        total = len(batches)
    except TypeError:  # streaming data sets have no length
        total = None
    return tqdm(batches, desc=description, total=total, unit="batch", disable=bars_off(show), leave=False)


def compute_scores(
    model: nn.Module,
    score: str,
    data: Mapping[str, Iterable] | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    loss_fn: LossFunction = default_loss,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    state_device: str | torch.device | None = None,
    shard: bool = True,
    progress: bool = True,
    relative_to: Mapping[str, torch.Tensor] | None = None,
) -> Tensors:
    """Per-parameter fp32 scores of `score` for the parameters selected by `include`/`exclude` patterns.

    `data` maps each role the score needs ("forget", "retain", "calibration" or "data") to an iterable of
    batches: dicts of tensors for Hugging Face models (``labels`` included), or ``(inputs, targets)`` pairs.
    Each role is streamed once; the model is put in eval mode and left exactly as it was found.
    Under `torch.distributed`, each process takes every world-th batch of the same loader (set `shard=False`
    if the loaders are already split per process) and the statistics are summed across processes once at the end.
    `state_device="cpu"` keeps the accumulators off the accelerator for models too large for two copies.
    With `relative_to` (name -> tensor, e.g. the weights before a fine-tune), weight-based scores read the update
    θ − θ_ref instead of θ: `magnitude` becomes |Δθ| and `wanda` |ΔW_ij| · ‖X_j‖₂.

    A model sharded by FSDP2 (`fully_shard`, every parameter a `DTensor`) gives the single-process scores as
    `DTensor`s sharded like the parameters: each process accumulates its own shard from the gradients FSDP
    reduce-scatters, and all processes step together (one padding step, weighted 0, for those that run out of
    batches first). Scores needing squared gradients (fisher) make every process take every batch instead of
    every world-th one, as FSDP's gradient is already the mean over the processes' batches.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # DDP would average gradients per batch; we sum once at the end instead
    spec = get_score(score)
    score_options = spec.validate_options(options)
    data = dict(data or {})
    missing = [role for role in spec.roles if role not in data]
    if missing:
        raise SafeEditError(f"score '{score}' needs data for role(s) {missing}; it reads {list(spec.roles)}")
    unused = [role for role in data if role not in spec.roles]
    if unused:
        raise SafeEditError(
            f"score '{score}' does not read data role(s) {unused}; it reads {list(spec.roles) or 'none'}"
        )

    params = select_parameters(model, include, exclude)
    shards = Shards.of(params)
    corrupt = [name for name, p in params.items() if not torch.isfinite(local(p)).all()]
    if found_anywhere(corrupt, shards):
        where = f"parameter {corrupt[0]!r}" if corrupt else "a parameter shard on another process"
        raise SafeEditError(f"{where} holds NaN or infinite values; the model is corrupt, reload it")
    device = local(next(iter(params.values()))).device
    rank, world = rank_and_world()

    states: dict[str, Tensors] = {}
    scale: dict[str, int] = {}  # per role: what turns FSDP's mean over processes back into a sum
    in_grad = _summed_in_grad(spec.statistics, params, shards, state_device)
    with attribution_mode(model, params):
        for arg, stat in spec.statistics.items():
            if arg not in in_grad:
                states[arg] = stat.init_states(model, params, torch.device(state_device) if state_device else None)
        for role in spec.roles:
            role_stats = {arg: (stat, states[arg]) for arg, stat in spec.statistics.items()
                          if stat.role == role and arg not in in_grad}
            role_in_grad = [arg for arg in in_grad if spec.statistics[arg].role == role]
            every_batch = shards is not None and not all(stat.linear for stat, _ in role_stats.values())
            if every_batch and not shard:
                raise SafeEditError(
                    f"score '{score}' squares gradients, and FSDP's are means over the processes' batches: give "
                    "every process the whole data and shard=True (each then takes every batch)"
                )
            scale[role] = 1 if every_batch or shards is None else shards.world
            batches = shard_batches(data[role], rank, world) if shard and not every_batch else data[role]
            batches = _progress(batches, f"{score}: {role}", progress and rank == 0)
            steps = lockstep(batches, data[role]) if shards is not None else ((batch, True) for batch in batches)
            seen = torch.tensor([_stream(model, steps, role, role_stats, params, loss_fn, forward_fn, device,
                                         keep_grad=bool(role_in_grad))])
            for arg in role_in_grad:
                states[arg] = _take_grads(params)
            all_reduce_sum([seen])
            if seen.item() == 0:
                raise SafeEditError(f"the {role} data is empty; give at least one example")
    _reduce(spec.statistics, states, params, scale)
    weights = {name: p.detach() for name, p in params.items()}
    if relative_to is not None:
        missing = [name for name in params if name not in relative_to]
        if missing:
            raise SafeEditError(f"relative_to has no tensor for {missing[0]!r}; give the reference model's weights")
        weights = {
            name: w - shard_like(relative_to[name].to(local(w).device, w.dtype), w) for name, w in weights.items()
        }
    return spec.function(weights, **states, **score_options)


def activation_statistics(
    model: nn.Module, score: str, data: Mapping[str, Iterable], params: Mapping[str, torch.Tensor],
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward, progress: bool = True,
) -> dict[str, Tensors]:
    """The states of a score whose statistics need only forward passes (Wanda's input squares), summed on the CPU
    over every batch of each role in one process: for a model whose weights are not all in memory (offloaded by
    `accelerate`, see `safeedit.streaming`), so neither the weights nor their device are read here."""
    spec = get_score(score)
    if any(stat.needs_backward for stat in spec.statistics.values()):
        raise SafeEditError(f"score '{score}' needs gradients; only activation scores (wanda) stream this way")
    states = {arg: stat.init_states(model, params, torch.device("cpu")) for arg, stat in spec.statistics.items()}
    with attribution_mode(model, params):
        for role in spec.roles:
            role_stats = {arg: (stat, states[arg]) for arg, stat in spec.statistics.items() if stat.role == role}
            batches = _progress(data[role], f"{score}: {role}", progress)
            steps = ((batch, True) for batch in batches)
            if _stream(model, steps, role, role_stats, params, default_loss, forward_fn, torch.device("cpu")) == 0:
                raise SafeEditError(f"the {role} data is empty; give at least one example")
    return states


def _reduce(
    statistics: Mapping[str, Statistic], states: dict[str, Tensors], params: Mapping[str, torch.Tensor],
    scale: Mapping[str, int],
) -> None:
    """Make the states whole, in place: per-process sums are all-reduced. Under FSDP, gradient states are already
    reduced (FSDP's mean, scaled back to a sum) and become `DTensor`s sharded like their parameters; the others
    (activation statistics) become replicated `DTensor`s, so score functions compute in `DTensor` arithmetic."""
    all_reduce_sum(
        state for arg, stat in statistics.items() for name, state in states[arg].items()
        if not (stat.needs_backward and is_sharded(params[name]))
    )
    for arg, stat in statistics.items():
        for name, state in states[arg].items():
            param = params[name]
            if is_sharded(param):
                states[arg][name] = (
                    wrap_like(state.mul_(scale[stat.role]), param) if stat.needs_backward
                    else replicate_like(state, param)
                )


def _summed_in_grad(
    statistics: Mapping[str, Statistic], params: Mapping[str, nn.Parameter], shards: Shards | None,
    state_device: str | torch.device | None,
) -> set[str]:
    """The gradient sums autograd accumulates in `param.grad` itself, across the backward passes of their role,
    instead of adding each batch's gradient into an fp32 state set of their own: one full-size fp32 set fewer
    (`wagle`: one accumulator set, not two; `saliency`: none). Chosen where that sum is the states' sum bit for bit:
    fp32 plain (unsharded) parameters, the states on the parameters' devices, and the sum the only backward statistic
    of its role. A bf16 model's gradients would be summed in bf16, and FSDP's sharded gradients are scaled and
    padded by lock steps: those keep their states."""
    if shards is not None or any(p.dtype != torch.float32 for p in params.values()):
        return set()
    if state_device is not None and any(p.device != torch.device(state_device) for p in params.values()):
        return set()
    chosen = set()
    for role in dict.fromkeys(stat.role for stat in statistics.values()):
        backward = [arg for arg, stat in statistics.items() if stat.role == role and stat.needs_backward]
        if len(backward) == 1 and statistics[backward[0]].summed_by_autograd:
            chosen.add(backward[0])
    return chosen


def _take_grads(params: Mapping[str, nn.Parameter]) -> Tensors:
    """The gradients autograd summed over a role's batches, taken off the parameters as that role's states.

    Autograd's sum g1 + g2 + ... equals the states' 0 + g1 + g2 + ... bit for bit but for the sign of a sum that is
    exactly zero (-0.0 where every term was -0.0); adding +0.0 once makes it +0.0, as the states' is."""
    taken = {}
    for name, p in params.items():
        grad, p.grad = p.grad, None
        taken[name] = grad.add_(0.0) if grad is not None else torch.zeros(p.shape, dtype=torch.float32,
                                                                          device=p.device)
    return taken


def _stream(model, steps, role, role_stats, params, loss_fn, forward_fn, device, keep_grad: bool = False) -> int:
    """Add every (batch, counts) step into the role's statistics, a step that does not count with weight 0;
    return the number of counted batches this process saw. With `keep_grad`, the gradients are left to accumulate
    in `param.grad` across the role's batches (see `_summed_in_grad`)."""
    context = BatchContext()
    hooks = [h for stat, state in role_stats.values() for h in stat.attach(model, state, context)]
    needs_backward = keep_grad or any(stat.needs_backward for stat, _ in role_stats.values())
    seen = 0
    try:
        for index, (batch, counts) in enumerate(steps):
            batch = to_device(batch, device)
            context.token_mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            context.counts = counts
            if needs_backward:
                loss = loss_fn(model, batch) * (1.0 if counts else 0.0)
                if not torch.isfinite(loss):
                    raise SafeEditError(
                        f"the {role} loss is {loss.item()} at batch {index}; check the weights and inputs for NaN"
                    )
                loss.backward()
                for stat, state in role_stats.values():
                    stat.after_backward(state, params)
                if not keep_grad:
                    for p in params.values():
                        p.grad = None
            else:
                with torch.no_grad():
                    forward_fn(model, batch)
            seen += counts
    finally:
        for handle in hooks:
            handle.remove()
    return seen
