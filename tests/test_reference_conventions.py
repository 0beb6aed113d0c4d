"""Known answers for the counting and sign conventions the reference implementations use (issue 19).

Every expected tensor below was worked out by hand from the published definitions, not by calling safeedit:
- TIES, `trim="tensor"` (our default): mergekit, `mergekit/sparsify.py` `magnitude` (per tensor, k = int(density · n),
  we keep max(1, k)) and `mergekit/merge_methods/generalized_task_arithmetic.py` (`get_mask` "sum": elected sign +1
  where the sum is ≥ 0; kept where sign(δ) equals it; sum of kept / their count, a count of 0 dividing by 1).
- TIES, `trim="global"`: one round-half-up threshold over the whole task vector, elected sign = sign(sum) (a zero
  sum elects nothing): what safeedit did before, FusionBench's trim.
- `Mask.top_k(rounding="floor")`: int(r · n) entries per selection unit (SalUn's and WAGLE's count), at least 1.
Each test also states what the other convention gives, and asserts that it differs, so the test cannot pass under
both.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from safeedit import Mask
from safeedit.merge import ties, ties_vector, trimmed


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name}: {actual[name].tolist()} != {expected[name]}"


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


# --- TIES: per-tensor trim vs global trim ---------------------------------------------------------------------

# Two tensors (a: 4 entries, b: 2), two tasks, keep 0.5.
VECTORS = {"t1": {"a": t(0.8, 3.0, 0.1, -0.2), "b": t(0.5, -0.4)},
           "t2": {"a": t(-1.0, 2.0, 5.0, 0.3), "b": t(-0.6, 0.2)}}


def test_ties_per_tensor_and_global_trims_keep_different_entries():
    # per tensor: a keeps int(0.5 · 4) = 2, b keeps int(0.5 · 2) = 1
    #   t1: a |δ| 0.8, 3, 0.1, 0.2 -> {3, 0.8};  b |δ| 0.5, 0.4 -> {0.5}
    #   t2: a |δ| 1, 2, 5, 0.3 -> {5, 2};        b |δ| 0.6, 0.2 -> {0.6}
    # global: round(0.5 · 6) = 3 per task over a and b together
    #   t1: 3, 0.8, 0.5 (a0, a1, b0): the same as per tensor
    #   t2: 5, 2, 1 (a2, a1, a0): b keeps nothing, a0 = -1 is kept
    assert_same(trimmed(VECTORS["t2"], 0.5, "tensor"), {"a": t(0.0, 2.0, 5.0, 0.0), "b": t(-0.6, 0.0)})
    assert_same(trimmed(VECTORS["t2"], 0.5, "global"), {"a": t(-1.0, 2.0, 5.0, 0.0), "b": t(0.0, 0.0)})
    # per tensor: a sums (0.8, 5, 5, 0) -> + + + + ; kept means: 0.8, (3 + 2) / 2, 5, nothing -> 0
    #             b sums (0.5 - 0.6, 0) -> - + ;      kept: -0.6, nothing -> 0
    per_tensor = {"a": t(0.8, 2.5, 5.0, 0.0), "b": t(-0.6, 0.0)}
    # global: a sums (0.8 - 1, 5, 5, 0) -> - + + 0 ; kept: -1, 2.5, 5, 0;  b sums (0.5, 0) -> + 0 ; kept: 0.5, 0
    whole = {"a": t(-1.0, 2.5, 5.0, 0.0), "b": t(0.5, 0.0)}
    assert_same(ties_vector(VECTORS, keep=0.5), per_tensor)  # the default is mergekit's
    assert_same(ties_vector(VECTORS, keep=0.5, trim="tensor"), per_tensor)
    assert_same(ties_vector(VECTORS, keep=0.5, trim="global"), whole)
    assert differ(per_tensor, whole)
    # θ₀ + λ · mixed
    base = {"a": t(1.0, 1.0, 1.0, 1.0), "b": t(0.0, 0.0)}
    merged = ties(base, VECTORS, keep=0.5, scale=0.5)
    for name in base:
        assert torch.equal(merged[name], base[name] + 0.5 * per_tensor[name])


def test_zero_sum_elects_plus_per_tensor_and_nothing_globally():
    vectors = {"t1": {"w": t(2.0, 1.0)}, "t2": {"w": t(-2.0, 3.0)}}
    # keep 1.0: both trims keep everything, so only the sign rule differs.
    # w0: 2 + (-2) = 0 -> mergekit elects + and keeps {2} -> 2; sign(0) = 0 elects nothing -> 0
    # w1: 1 + 3 = 4 -> +, mean of {1, 3} = 2 under both
    assert_same(ties_vector(vectors, keep=1.0, trim="tensor"), {"w": t(2.0, 2.0)})
    assert_same(ties_vector(vectors, keep=1.0, trim="global"), {"w": t(0.0, 2.0)})


def test_all_equal_magnitudes_keep_the_count_of_the_convention():
    # five equal |δ| = 0.5, keep 0.5: per tensor int(2.5) = 2 entries, globally round-half-up(2.5) = 3.
    # Which of the tied entries win is not part of the convention (mergekit's argsort states no order): the test
    # checks the count and that every kept value is the task's own (one task: the elected sign is its sign).
    w = t(0.5, -0.5, 0.5, -0.5, 0.5)
    for trim, count in (("tensor", 2), ("global", 3)):
        merged = ties_vector({"only": {"w": w}}, keep=0.5, trim=trim)["w"]
        kept = merged != 0
        assert int(kept.sum()) == count, trim
        assert torch.equal(merged[kept], w[kept]), trim
    # safeedit's own tie rule (masks.py): the lower flat index wins
    assert_same(ties_vector({"only": {"w": w}}, keep=0.5, trim="tensor"), {"w": t(0.5, -0.5, 0.0, 0.0, 0.0)})


def test_keep_times_n_below_one_keeps_the_largest_entry_of_each_tensor():
    # keep 0.1: a (3 entries) int(0.3) = 0 -> at least 1: -0.7; b (10 entries) int(1.0) = 1: 0.9.
    # globally round-half-up(0.1 · 13 = 1.3) = 1 over both tensors: only 0.9, a keeps nothing.
    vector = {"a": t(0.1, -0.7, 0.3), "b": t(0.05, 0.2, -0.1, 0.9, 0.4, -0.3, 0.6, 0.15, 0.25, 0.35)}
    b_kept = t(0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert_same(ties_vector({"only": vector}, keep=0.1, trim="tensor"), {"a": t(0.0, -0.7, 0.0), "b": b_kept})
    assert_same(ties_vector({"only": vector}, keep=0.1, trim="global"), {"a": t(0.0, 0.0, 0.0), "b": b_kept})


# --- Mask.top_k: floor vs half-up counts ----------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_floor_and_half_up_counts_differ_at_a_half(scope):
    scores = {"w": t(5.0, 4.0, 3.0, 2.0, 1.0)}  # n = 5, r = 0.5: int(2.5) = 2, round-half-up(2.5) = 3
    floor = Mask.top_k(scores, 0.5, scope=scope, rounding="floor")
    half_up = Mask.top_k(scores, 0.5, scope=scope)
    assert floor.tensors["w"].tolist() == [True, True, False, False, False]
    assert half_up.tensors["w"].tolist() == [True, True, True, False, False]
    # the metadata names the rounding only when it is floor: half-up masks stay as they were
    assert floor.metadata == {"ratio": "0.5", "scope": scope, "rounding": "floor"}
    assert half_up.metadata == {"ratio": "0.5", "scope": scope}


def test_floor_and_half_up_counts_per_row_and_at_least_one_per_row():
    scores = {"w": torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])}
    floor = Mask.top_k(scores, 0.5, scope="row", rounding="floor").tensors["w"]
    half_up = Mask.top_k(scores, 0.5, scope="row").tensors["w"]
    assert floor.tolist() == [[True, True, False, False, False], [False, False, False, True, True]]
    assert half_up.tolist() == [[True, True, True, False, False], [False, False, True, True, True]]
    # r · n = 0.25 per row: floor 0 -> at least 1 per row; half-up 0 -> none
    floor = Mask.top_k(scores, 0.05, scope="row", rounding="floor").tensors["w"]
    assert floor.tolist() == [[True, False, False, False, False], [False, False, False, False, True]]
    assert not Mask.top_k(scores, 0.05, scope="row").tensors["w"].any()


def test_floor_keeps_at_least_one_per_tensor_and_one_globally():
    scores = {"a": t(0.1, 0.7, 0.3), "b": t(0.2, 0.9)}  # r = 0.1: a 0.3, b 0.2, all 0.5 -> floor 0 each
    per_tensor = Mask.top_k(scores, 0.1, scope="tensor", rounding="floor")
    assert per_tensor.tensors["a"].tolist() == [False, True, False]
    assert per_tensor.tensors["b"].tolist() == [False, True]
    assert Mask.top_k(scores, 0.1, scope="tensor").selected == 0  # half-up: round(0.3) = round(0.2) = 0
    everything = Mask.top_k(scores, 0.1, scope="global", rounding="floor")
    assert everything.tensors["a"].tolist() == [False, False, False]
    assert everything.tensors["b"].tolist() == [False, True]
    assert Mask.top_k(scores, 0.1, scope="global").selected == 1  # half-up: round(0.5) = 1, the same entry


# --- `safeedit merge --method ties`: the default is mergekit's, `--trim global` the old function ----------------


def mergekit_style_ties(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], density: float,
                        lam: float) -> dict[str, torch.Tensor]:
    """TIES as mergekit computes it (our port of the definitions; weights 1, normalize on), with max(1, k)."""
    merged = {}
    for name, theta0 in base.items():
        trimmed_deltas = []
        for task in tasks:
            delta = (task[name] - theta0).reshape(-1)
            k = max(1, int(density * delta.numel()))
            keep = torch.zeros_like(delta)
            keep[torch.argsort(delta.abs(), descending=True, stable=True)[:k]] = 1
            trimmed_deltas.append((delta * keep).reshape(theta0.shape))
        deltas = torch.stack(trimmed_deltas)
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        agree = (deltas.sign() == majority).to(deltas.dtype)
        divisor = agree.sum(dim=0)
        divisor[divisor == 0] = 1
        merged[name] = theta0 + lam * ((deltas * agree).sum(dim=0) / divisor)
    return merged


def old_ties(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], keep: float,
             scale: float) -> dict[str, torch.Tensor]:
    """safeedit's TIES before the per-tensor default (commit 7a002cc), written out."""
    kept = []
    for task in tasks:
        vector = {name: task[name] - theta0 for name, theta0 in base.items()}
        mask = Mask.top_k({name: d.abs() for name, d in vector.items()}, keep, scope="global")
        kept.append({name: d * mask.tensors[name].to(d.dtype) for name, d in vector.items()})
    merged = {}
    for name, theta0 in base.items():
        stacked = torch.stack([vector[name] for vector in kept])
        elected = torch.sign(stacked.sum(dim=0))
        agrees = (torch.sign(stacked) == elected) & (stacked != 0)
        merged[name] = theta0 + (0 + scale * ((stacked * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)))
    return merged


def test_merge_command_default_is_mergekit_ties_and_trim_global_is_the_old_function(tmp_path, capsys):
    import transformers

    from safeedit.cli import main

    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=12)
    torch.manual_seed(0)
    base = transformers.BertModel(config)
    base.save_pretrained(tmp_path / "base")
    folders = []
    for seed in (1, 2):
        tuned = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        tuned.save_pretrained(tmp_path / f"task{seed}")
        folders.append(str(tmp_path / f"task{seed}"))

    def parameters(folder: str) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in transformers.BertModel.from_pretrained(folder).named_parameters()}

    theta0, tasks = parameters(str(tmp_path / "base")), [parameters(folder) for folder in folders]
    assert main(["merge", str(tmp_path / "base"), *folders, "--method", "ties", "--out", str(tmp_path / "new")]) == 0
    assert main(["merge", str(tmp_path / "base"), *folders, "--method", "ties", "--trim", "global",
                 "--out", str(tmp_path / "old")]) == 0
    new, old = parameters(str(tmp_path / "new")), parameters(str(tmp_path / "old"))
    assert_same(new, mergekit_style_ties(theta0, tasks, density=0.2, lam=1.0))
    assert_same(old, old_ties(theta0, tasks, keep=0.2, scale=1.0))
    assert differ(new, old)
    assert json.loads((tmp_path / "new" / "merge.json").read_text())["trim"] == "tensor"
    assert json.loads((tmp_path / "old" / "merge.json").read_text())["trim"] == "global"
    code = main(["merge", str(tmp_path / "base"), *folders, "--trim", "global", "--out", str(tmp_path / "ta")])
    assert code == 2 and "--trim does not apply to --method task_arithmetic" in capsys.readouterr().err
