"""FSDP2 on 2 CPU processes (gloo): a tiny Llama sharded per decoder layer and at the root gives the single-process
scores, the single-process masks (ties across shards included), the single-process masked AdamW run and the
single-process LLM unlearning run (in place, with accumulation, checkpointing or bf16), with masked-out weights
bit-identical."""

from __future__ import annotations

import fsdp_cases as C
import helpers as H
import pytest
import torch

from safeedit import Mask
from safeedit.masks import SCOPES

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """Every case of fsdp_cases.CASES, run once in 2 spawned processes; per rank, whole tensors and errors."""
    return H.spawn_and_collect(C.worker, C.WORLD, tmp_path_factory.mktemp("fsdp2"), TIMEOUT_S)


def results_of(sharded_results, case: str) -> dict[str, torch.Tensor]:
    """The case's tensors, after checking that it ran in every process and that all processes agree."""
    per_rank = []
    for rank, (results, errors) in enumerate(sharded_results):
        assert case not in errors, f"rank {rank}: {errors[case]}"
        per_rank.append(results[case])
    for name, value in per_rank[0].items():
        assert torch.equal(per_rank[1][name], value), f"the processes disagree on {name}"
    return per_rank[0]


@pytest.mark.parametrize("score", sorted(C.SCORES))
def test_sharded_scores_match_one_process(sharded_results, score):
    got = results_of(sharded_results, f"scores/{score}")
    expected = C.scores(score, sharded=False)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if ":" not in name:  # (masks: see below)
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("score", C.SELECTED_SCORES)
def test_masks_of_sharded_scores_match_one_process(sharded_results, score):
    """The mask selected from FSDP scores, sharded, is the one a single process selects from the same scores."""
    got = results_of(sharded_results, f"scores/{score}")
    scores = {name: value for name, value in got.items() if ":" not in name}
    for scope in SCOPES:
        for name, value in Mask.top_k(scores, 0.3, scope).tensors.items():
            assert torch.equal(got[f"{scope}:{name}"], value), f"{scope}: {name}"


@pytest.mark.parametrize("kind", C.MASK_SCORES)
def test_sharded_masks_match_one_process(sharded_results, kind):
    got = results_of(sharded_results, f"masks/{kind}")
    expected = C.masks(kind, sharded=False)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    if kind == "constant":  # all tied: the first k entries in name order, then row-major order
        scores = C.constructed_scores(kind)
        k = H.target_count(0.3, sum(t.numel() for t in scores.values()))
        first_k = H.brute_force_top_k(scores, k)
        for name, value in first_k.items():
            assert torch.equal(got[f"global-0.3-half_up:{name}"], value), name


def test_masked_sharded_training_matches_one_process(sharded_results):
    before = {name: p.detach() for name, p in C.llama(sharded=False).named_parameters()}
    mask = C.train_mask()
    expected = C.train("whole")
    whole, sharded = (results_of(sharded_results, f"train/{layout}") for layout in ("whole", "sharded"))
    for name, start in before.items():
        assert torch.equal(sharded[name], whole[name]), f"{name}: a sharded mask trains unlike a whole one"
        keep = mask.tensors.get(name, torch.zeros_like(start, dtype=torch.bool))
        assert torch.equal(whole[name][~keep], start[~keep]), f"masked-out entries of {name} changed"
        assert torch.equal(expected[name][~keep], start[~keep]), f"masked-out entries of {name} changed (1 process)"
        if keep.any():  # (all of them but the padding token's embedding row, which gets no gradient)
            assert (whole[name][keep] != start[keep]).any(), f"no masked-in entry of {name} moved"
        torch.testing.assert_close(whole[name], expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method", sorted(C.UNLEARN_RUNS))
def test_masked_sharded_unlearning_matches_one_process(sharded_results, method):
    """`lm_unlearn` in place on the FSDP2 model, every process on the same data: the single-process mask and
    weights (float tolerance; bf16 autocast: its own), masked-out weights bit-identical."""
    got = results_of(sharded_results, f"unlearn/{method}")
    expected = C.unlearn(method, sharded=False)
    before = dict(C.llama(sharded=False).named_parameters())
    tolerance = {"rtol": 1e-2, "atol": 1e-3} if C.UNLEARN_RUNS[method].get("mixed_precision") == "bf16" else \
        {"rtol": 1e-5, "atol": 1e-6}
    moved = 0
    for name, start in before.items():
        keep = expected[f"mask:{name}"]
        assert torch.equal(got[f"mask:{name}"], keep), f"{name}: the sharded mask differs"
        assert torch.equal(got[name][~keep], start.detach()[~keep]), f"masked-out entries of {name} changed"
        moved += int((got[name][keep] != start.detach()[keep]).sum())
        torch.testing.assert_close(got[name], expected[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    assert moved > 0


def test_sharded_unlearning_without_in_place_fails_with_one_line(sharded_results):
    assert results_of(sharded_results, "unlearn-needs-in-place")["raised"].item() == 1
