"""DARE (Yu et al., ICML 2024): drop each task-vector entry with probability 1 - p, rescale the kept ones by 1/p,
then task arithmetic θ₀ + λ Σᵢ τ̃ᵢ; known answers on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from safeedit.errors import SafeEditError
from safeedit.merge.baselines import task_arithmetic
from safeedit.merge.dare import DareOptions, dare_vectors
from safeedit.methods import get_method

BASE = {"w": torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), "b": torch.tensor([0.25, -0.75])}
VECTORS = {"a": {"w": torch.tensor([[0.5, -1.5, 2.0], [-0.25, 1.0, 0.75]]), "b": torch.tensor([1.0, -2.0])},
           "b": {"w": torch.tensor([[-1.0, 0.5, 0.125], [2.0, -0.5, 1.5]]), "b": torch.tensor([-0.5, 3.0])}}


def test_density_one_is_task_arithmetic_exactly():
    sparse = dare_vectors(VECTORS, density=1.0, seed=7)
    assert all(torch.equal(sparse[t][n], VECTORS[t][n]) for t in VECTORS for n in VECTORS[t])
    merged, plain = task_arithmetic(BASE, sparse, 0.3), task_arithmetic(BASE, VECTORS, 0.3)
    assert all(torch.equal(merged[n], plain[n]) for n in BASE)


def test_kept_entries_are_rescaled_and_dropped_ones_are_zero():
    density = 0.3
    sparse = dare_vectors(VECTORS, density, seed=0)
    kept = dropped = 0
    for task, vector in VECTORS.items():
        for name, tau in vector.items():
            out = sparse[task][name]
            keep = out != 0  # no τ entry is 0, so a zero is a drop
            assert torch.equal(out[keep], tau[keep] / density)
            assert torch.equal(out[~keep], torch.zeros_like(tau[~keep]))
            kept, dropped = kept + int(keep.sum()), dropped + int((~keep).sum())
    assert kept and dropped  # this seed keeps some entries and drops others


def test_the_dare_vector_is_unbiased():
    # E[m ⊙ τ / p] = τ: the mean over many seeds approaches τ (sd of one entry's mean ≈ |τ| √((1-p)/(p n)))
    density, seeds = 0.5, 4000
    total = {name: torch.zeros_like(t) for name, t in VECTORS["a"].items()}
    for seed in range(seeds):
        for name, tensor in dare_vectors({"a": VECTORS["a"]}, density, seed)["a"].items():
            total[name] += tensor
    for name, tau in VECTORS["a"].items():
        assert torch.allclose(total[name] / seeds, tau, atol=0.1 * tau.abs().max().item())


def test_the_same_seed_gives_the_same_merge_and_tasks_draw_differently():
    first, again, other = (dare_vectors(VECTORS, 0.5, seed) for seed in (3, 3, 4))
    assert all(torch.equal(first[t][n], again[t][n]) for t in VECTORS for n in VECTORS[t])
    assert any(not torch.equal(first[t][n], other[t][n]) for t in VECTORS for n in VECTORS[t])
    # task i draws from seed + i: task "b" of seed 3 is task "a"'s draw of seed 4, applied to "b"'s vector
    shifted = dare_vectors({"x": VECTORS["b"]}, 0.5, 4)["x"]
    assert all(torch.equal((first["b"][n] != 0), (shifted[n] != 0)) for n in VECTORS["b"])


def test_density_must_be_in_zero_one():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            DareOptions(density=bad)
        with pytest.raises(ValueError, match="density"):
            dare_vectors(VECTORS, bad, 0)
    assert DareOptions(density=1.0).density == 1.0


def test_dare_is_a_registered_merge_and_its_options_reject_an_unknown_key():
    spec = get_method("merge", "dare")
    assert spec.options is DareOptions and spec.paper.startswith("Yu et al.")
    assert spec.validate({"density": 0.9}).density == 0.9
    with pytest.raises(SafeEditError, match=r"methods\.dare: densty"):
        spec.validate({"densty": 0.9}, "scenario 'x'")
