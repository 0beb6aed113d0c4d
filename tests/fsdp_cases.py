"""What the FSDP2 test runs, in one process and in each of the processes it spawns (so it is a plain module they
can import, like helpers): a tiny Llama sharded per decoder layer and at the root, and the cases computed on it.

Every case returns whole tensors, so the spawned processes' results compare directly with the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable

import helpers as H
import torch
from torch import nn

from safeedit import Mask, compute_scores, masked_training
from safeedit.masks import SCOPES
from safeedit.sharding import gathered, is_sharded, shard_like

WORLD = 2
SCORES = {  # score -> (data roles, options)
    "saliency": (("forget",), None),
    "wagle": (("forget", "retain"), {"gamma": 0.5}),
    "fisher": (("data",), None),
    "wanda": (("calibration",), None),
    "magnitude": ((), None),
    "random": ((), {"seed": 3}),
}
SELECTED_SCORES = ("saliency", "wagle")  # whose masks are selected from the scores as computed (sharded or not)
MASK_SCORES = ("ties", "constant")  # constructed scores: few distinct values, and one value everywhere
MASK_SELECTIONS = (("global", 0.3, "half_up"), ("global", 0.5, "floor"), ("tensor", 0.3, "half_up"),
                   ("row", 0.4, "half_up"))
TRAIN_STEPS = 3
FROZEN = "model.norm.weight"  # a mask entry that is all False: the parameter is frozen
UNMASKED = "model.layers.1.mlp.down_proj.weight"  # no mask entry: frozen too


def llama(sharded: bool) -> nn.Module:
    """The tiny Llama of the tests; with `sharded`, under FSDP2 as a user shards it (each layer, then the root)."""
    model = H.make_llama(seed=0)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def score_data() -> dict[str, list]:
    """Three forget batches (odd: under 2 processes, one runs a padding step), two retain batches."""
    forget = H.token_batches(3, [6, 4], vocab=100, seed=1)
    return {"forget": forget, "retain": H.token_batches(2, [5, 5], vocab=100, seed=2), "data": forget,
            "calibration": forget}


def scores(score: str, sharded: bool) -> dict[str, torch.Tensor]:
    """The scores, whole; for SELECTED_SCORES also "scope:name" entries: the masks selected from the scores as
    computed (sharded ones, under FSDP), gathered whole."""
    roles, options = SCORES[score]
    data = score_data()
    result = compute_scores(llama(sharded), score, {role: data[role] for role in roles}, options=options,
                            progress=False)
    assert all(is_sharded(t) == sharded for t in result.values()), score
    out = {name: gathered(t) for name, t in result.items()}
    for scope in SCOPES if score in SELECTED_SCORES else ():
        out.update({f"{scope}:{n}": t for n, t in Mask.top_k(result, 0.3, scope).full_tensor().tensors.items()})
    return out


def constructed_scores(kind: str) -> dict[str, torch.Tensor]:
    """Whole score tensors full of ties (values 0-3, or all 1.0), identical in every process: the Llama's
    parameters, and tensors whose rows do not split evenly over 2 processes (one holds no row of `tiny.row`)."""
    generator = torch.Generator().manual_seed(7)
    shapes = {name: p.shape for name, p in H.make_llama(seed=0).named_parameters()}
    shapes.update({"tiny.row": (1, 5), "tiny.vector": (3,), "tiny.uneven": (5, 3)})
    if kind == "constant":
        return {name: torch.ones(shape) for name, shape in shapes.items()}
    return {name: torch.randint(0, 4, shape, generator=generator).float() for name, shape in shapes.items()}


def masks(kind: str, sharded: bool) -> dict[str, torch.Tensor]:
    """For each selection, the mask of the constructed scores (sharded on dim 0 as FSDP2 shards, with `sharded`),
    gathered whole, and its selected count as the mask reports it."""
    whole = constructed_scores(kind)
    if sharded:
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        whole = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in whole.items()}
    out = {}
    for scope, ratio, rounding in MASK_SELECTIONS:
        mask = Mask.top_k(whole, ratio, scope, rounding=rounding)
        key = f"{scope}-{ratio}-{rounding}"
        out.update({f"{key}:{name}": t for name, t in mask.full_tensor().tensors.items()})
        out[f"{key}:selected"] = torch.tensor(mask.selected)
    return out


def train_mask() -> Mask:
    """A seeded whole mask over all but one parameter, one entry all False."""
    generator = torch.Generator().manual_seed(11)
    tensors = {name: torch.rand(p.shape, generator=generator) < 0.4
               for name, p in H.make_llama(seed=0).named_parameters() if name != UNMASKED}
    tensors[FROZEN] = torch.zeros_like(tensors[FROZEN])
    return Mask(tensors)


def train_batches() -> list[list[dict]]:
    """Per step, one batch per process; the single-process run averages the losses of a step's batches."""
    return [H.token_batches(WORLD, [5, 3], vocab=100, seed=20 + step) for step in range(TRAIN_STEPS)]


def train(mask_layout: str, rank: int | None = None) -> dict[str, torch.Tensor]:
    """Masked AdamW (weight decay) with gradient clipping, a few steps; the weights after, whole.

    `rank` None is the single-process run; otherwise this process's batch of each step is batch `rank`, and
    the mask is passed `whole` or `sharded` like the model."""
    model = llama(sharded=rank is not None).train()
    mask = train_mask()
    if mask_layout == "sharded":
        params = dict(model.named_parameters())
        mask = Mask({name: shard_like(t, params[name]) for name, t in mask.tensors.items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with masked_training(model, mask, optimizer):
        for batches in train_batches():
            mine = batches if rank is None else batches[rank : rank + 1]
            loss = sum(model(**batch).loss for batch in mine) / len(mine)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
            optimizer.zero_grad()
    return {name: gathered(p.detach()) for name, p in model.named_parameters()}


# LLM unlearning under FSDP2 (every process runs the same call on the same data, editing its model in place): the
# method, and the large-model options it runs with.
UNLEARN_RUNS = {
    "graddiff+wagle": {"gradient_accumulation_steps": 2, "gradient_checkpointing": True},
    "npo+random": {"mixed_precision": "bf16"},
}


def unlearn(method: str, sharded: bool) -> dict[str, torch.Tensor]:
    """`lm_unlearn` of the tiny Llama (with `sharded`, in place, NPO against a second sharded copy); the weights
    after and the mask ("mask:name"), whole."""
    from test_wagle import FORGET, RETAIN, tokenizer

    from safeedit.unlearn.wagle import LMUnlearnOptions, lm_unlearn

    options = LMUnlearnOptions(epochs=2, lr=1e-2, batch_size=2, ratio=0.3, **UNLEARN_RUNS[method])
    model = llama(sharded)
    reference = llama(sharded) if sharded and method.startswith("npo") else None
    edited, mask = lm_unlearn(model, tokenizer(), FORGET, RETAIN, method, options, seed=0, progress=False,
                              in_place=sharded, reference=reference)
    assert (edited is model) == sharded
    out = {name: gathered(p.detach()) for name, p in edited.named_parameters()}
    out.update({f"mask:{name}": t for name, t in mask.full_tensor().tensors.items()})
    return out


def unlearn_needs_in_place(rank: int) -> dict[str, torch.Tensor]:
    """A sharded model without in_place: one SafeEditError line, before any work."""
    from test_wagle import FORGET, RETAIN, tokenizer

    from safeedit.errors import SafeEditError
    from safeedit.unlearn.wagle import LMUnlearnOptions, lm_unlearn

    try:
        lm_unlearn(llama(sharded=True), tokenizer(), FORGET, RETAIN, "graddiff", LMUnlearnOptions(epochs=1),
                   progress=False)
    except SafeEditError as error:
        return {"raised": torch.tensor(int("in_place=True" in str(error)))}
    return {"raised": torch.tensor(0)}


CASES: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {
    **{f"scores/{score}": (lambda rank, s=score: scores(s, sharded=True)) for score in SCORES},
    **{f"masks/{kind}": (lambda rank, k=kind: masks(k, sharded=True)) for kind in MASK_SCORES},
    **{f"train/{layout}": (lambda rank, m=layout: train(m, rank)) for layout in ("whole", "sharded")},
    **{f"unlearn/{method}": (lambda rank, m=method: unlearn(m, sharded=True)) for method in UNLEARN_RUNS},
    "unlearn-needs-in-place": unlearn_needs_in_place,
}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Entry point of each spawned process: run every case, save its tensors and any error per case."""
    H.run_cases_in_process_group(rank, world, init_file, out_dir,
                                 {case: (lambda run=run: run(rank)) for case, run in CASES.items()})
