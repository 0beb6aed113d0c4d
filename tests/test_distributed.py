"""Scores computed across 2 CPU processes (gloo) equal the single-process scores; batch sharding is a partition."""

from __future__ import annotations

import helpers as H
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from safeedit.attribution.distributed import shard_batches
from safeedit.sharding import rank_and_world

WORLD = 2
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Run every case of helpers.DISTRIBUTED_CASES once in 2 spawned processes; per rank, scores and errors."""
    return H.spawn_and_collect(H.distributed_worker, WORLD, tmp_path_factory.mktemp("distributed"), TIMEOUT_S)


@pytest.mark.parametrize("case", H.DISTRIBUTED_CASES)
def test_two_processes_match_one(distributed_results, case):
    assert rank_and_world() == (0, 1)  # the test process itself is not distributed
    expected = H.run_case(case)
    for rank, (scores, errors) in enumerate(distributed_results):
        assert case not in errors, f"rank {rank}: {errors[case]}"
        got = scores[case]
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(
                got[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}"
            )
    # every process ends with the same (all-reduced) scores
    first, second = (scores[case] for scores, _ in distributed_results)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --- sharding without a process group: every batch exactly once ---------------------------------------------------


def _ids(batch) -> list[int]:
    inputs = batch[0] if isinstance(batch, list | tuple) else batch
    return inputs.reshape(-1).long().tolist()


def _loaders() -> dict[str, object]:
    data = TensorDataset(torch.arange(20.0))
    return {
        "list": [torch.arange(i * 4, i * 4 + 4) for i in range(5)],
        "loader": DataLoader(data, batch_size=4),
        "loader_partial_last": DataLoader(TensorDataset(torch.arange(18.0)), batch_size=4),
        "loader_drop_last": DataLoader(data, batch_size=4, drop_last=True),
        "loader_drop_last_partial": DataLoader(TensorDataset(torch.arange(23.0)), batch_size=4, drop_last=True),
        "iterable_loader": DataLoader(H._Stream(torch.arange(18.0), torch.zeros(18)), batch_size=4),
    }


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", sorted(_loaders()))
def test_shard_batches_is_a_partition(kind, world):
    loader = _loaders()[kind]
    everything = [_ids(b) for b in loader]
    shards = [[_ids(b) for b in shard_batches(_loaders()[kind], rank, world)] for rank in range(world)]
    # round robin: process r takes batches r, r + world, ... of the single-process order, unchanged
    for rank in range(world):
        assert shards[rank] == everything[rank::world], f"rank {rank} of {world}"


def test_shard_batches_single_process_is_identity():
    batches = [1, 2, 3]
    assert shard_batches(batches, 0, 1) is batches
