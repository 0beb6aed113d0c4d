"""Mask selection (exact counts, deterministic ties) against a brute-force sort, set algebra and safe I/O."""

from __future__ import annotations

import random
from pathlib import Path

import helpers as H
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import safeedit.masks
from safeedit import Mask, SafeEditError

NAMES = ["layer.2.weight", "layer.10.weight", "b", "a.bias", "a.weight", "Z"]  # sorted order != insertion order
SHAPES = [(), (1,), (5,), (3, 4), (2, 3, 2), (7, 1), (1, 9), (4, 4)]
RATIOS = [0.01, 0.1, 0.2, 0.25, 0.5, 0.6, 0.73, 0.99, 1.0]


def random_values(shape, kind: str, generator: torch.Generator) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    if kind == "normal":
        values = torch.randn(n, generator=generator)
    elif kind == "few_ints":  # heavy ties
        values = torch.randint(0, 3, (n,), generator=generator).float()
    elif kind == "negative_ints":
        values = -torch.randint(0, 4, (n,), generator=generator).float()
    elif kind == "equal":
        values = torch.full((n,), 0.25)
    elif kind == "adjacent":  # same high 16 bits, differing low bits: exercises the second radix pass
        values = 1.0 + torch.randint(0, 5, (n,), generator=generator).float() * 2.0**-23
    elif kind == "mixed":  # both signs, large magnitudes, infinities, exact zeros
        pool = torch.tensor([float("-inf"), -1e30, -3.5, -1e-30, 0.0, 1e-38, 2.0, 2.0, 7e20, float("inf")])
        values = pool[torch.randint(0, len(pool), (n,), generator=generator)]
    else:
        raise AssertionError(kind)
    return values.reshape(shape)


KINDS = ["normal", "few_ints", "negative_ints", "equal", "adjacent", "mixed"]


def random_case(seed: int) -> tuple[dict[str, torch.Tensor], float]:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    kind = rng.choice(KINDS)
    names = rng.sample(NAMES, rng.randint(1, 4))
    scores = {name: random_values(rng.choice(SHAPES), kind, generator) for name in names}
    ratio = rng.choice(RATIOS) if rng.random() < 0.6 else rng.uniform(0.001, 1.0)
    return scores, ratio


def assert_masks_equal(actual: Mask, expected: dict[str, torch.Tensor], context="") -> None:
    assert list(actual.tensors) == list(expected), context
    for name, value in expected.items():
        assert actual.tensors[name].dtype == torch.bool
        assert actual.tensors[name].shape == value.shape, (context, name)
        assert torch.equal(actual.tensors[name], value), f"{context} {name}: {actual.tensors[name]} != {value}"


def check_against_brute_force(scores, ratio, context=""):
    total = sum(t.numel() for t in scores.values())
    global_mask = Mask.top_k(scores, ratio, "global")
    assert global_mask.selected == H.target_count(ratio, total), context
    assert_masks_equal(global_mask, H.brute_force_top_k(scores, H.target_count(ratio, total)), f"global {context}")

    tensor_mask = Mask.top_k(scores, ratio, "tensor")
    expected = {n: H.brute_force_top_k({n: t}, H.target_count(ratio, t.numel()))[n] for n, t in scores.items()}
    assert_masks_equal(tensor_mask, expected, f"tensor {context}")

    row_mask = Mask.top_k(scores, ratio, "row")
    assert_masks_equal(row_mask, {n: H.brute_force_rows(t, ratio) for n, t in scores.items()}, f"row {context}")


# --- exact counts and tie-breaking ------------------------------------------------------------------------------


def test_random_cases_match_brute_force():
    for seed in range(500):
        scores, ratio = random_case(seed)
        check_against_brute_force(scores, ratio, f"seed={seed} ratio={ratio}")


def test_random_cases_match_brute_force_with_tiny_chunks(monkeypatch):
    monkeypatch.setattr(safeedit.masks, "CHUNK", 7)
    for seed in range(1000, 1300):
        scores, ratio = random_case(seed)
        check_against_brute_force(scores, ratio, f"seed={seed} ratio={ratio} CHUNK=7")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 22])
def test_larger_tensors_against_topk(monkeypatch, chunk):
    monkeypatch.setattr(safeedit.masks, "CHUNK", chunk)
    generator = torch.Generator().manual_seed(chunk)
    size = 60 if chunk < 1000 else 30_000
    scores = {"b": torch.randn(size, generator=generator), "a": torch.randn(size // 3, 3, generator=generator)}
    k = H.target_count(0.137, int(size * 2))
    mask = Mask.top_k(scores, 0.137)
    flat = torch.cat([scores["a"].reshape(-1), scores["b"]])  # no ties in continuous noise
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.topk(k).indices] = True
    assert torch.equal(torch.cat([mask.tensors["a"].reshape(-1), mask.tensors["b"]]), expected)


def test_all_equal_scores_ties_go_to_earlier_name_then_lower_index():
    scores = {"b": torch.ones(4, 5), "a": torch.ones(3)}  # insertion order b, a; sorted order a, b
    mask = Mask.top_k(scores, 0.3)  # round(0.3 · 23) = 7: all of "a", then the first 4 of "b"
    assert mask.selected == 7
    assert mask.tensors["a"].all()
    assert mask.tensors["b"].reshape(-1).tolist() == [True] * 4 + [False] * 16
    per_tensor = Mask.top_k(scores, 0.3, "tensor")  # round(6.0) = 6 of b, round(0.9) = 1 of a
    assert per_tensor.tensors["a"].tolist() == [True, False, False]
    assert per_tensor.tensors["b"].reshape(-1).tolist() == [True] * 6 + [False] * 14
    rows = Mask.top_k(scores, 0.5, "row")  # round(2.5) = 3 per row of b, round(1.5) = 2 of a
    assert rows.tensors["b"].tolist() == [[True, True, True, False, False]] * 4
    assert rows.tensors["a"].tolist() == [True, True, False]


def test_ties_straddling_the_threshold_with_names_sorting_unlike_numbers():
    scores = {
        "layer.2.weight": torch.tensor([5.0, 1.0, 3.0, 3.0]),
        "layer.10.weight": torch.tensor([3.0, 0.0, 3.0]),  # sorts before layer.2 as a string
    }
    mask = Mask.top_k(scores, 4 / 7)  # 4 entries: the 5, then three of the four 3s: layer.10's two first
    assert mask.tensors["layer.10.weight"].tolist() == [True, False, True]
    assert mask.tensors["layer.2.weight"].tolist() == [True, False, True, False]


def test_negative_scores_and_infinities():
    scores = {"w": torch.tensor([-1.0, -3.0, float("-inf"), -2.0, float("inf"), -1.0])}
    assert Mask.top_k(scores, 0.5).tensors["w"].tolist() == [True, False, False, False, True, True]
    assert Mask.top_k(scores, 5 / 6).tensors["w"].tolist() == [True, True, False, True, True, True]


def test_signed_zeros_are_ties():
    """−0.0 == +0.0, so they are equal scores and the documented tie rule applies (lower index first)."""
    scores = {"w": torch.tensor([-0.0, 0.0, -0.0, 0.0])}
    expected = H.brute_force_top_k(scores, 2)["w"]
    assert expected.tolist() == [True, True, False, False]
    assert Mask.top_k(scores, 0.5).tensors["w"].tolist() == expected.tolist()
    assert Mask.top_k(scores, 0.5, "row").tensors["w"].tolist() == expected.tolist()


def test_halves_round_up():
    assert Mask.top_k({"w": torch.arange(5.0)}, 0.5).selected == 3  # 2.5 -> 3
    assert Mask.top_k({"w": torch.arange(6.0)}, 0.25).selected == 2  # 1.5 -> 2
    assert Mask.top_k({"w": torch.arange(10.0)}, 0.05).selected == 1  # 0.5 -> 1
    assert Mask.top_k({"w": torch.arange(10.0)}, 0.04).selected == 0  # 0.4 -> 0
    row = Mask.top_k({"w": torch.arange(15.0).reshape(3, 5)}, 0.5, "row")
    assert row.tensors["w"].sum(1).tolist() == [3, 3, 3]
    assert row.tensors["w"][0].tolist() == [False, False, True, True, True]


def test_scopes_differ_and_row_scope_counts_per_row():
    generator = torch.Generator().manual_seed(0)
    scores = {"big": torch.randn(6, 10, generator=generator) * 100, "small": torch.randn(4, 5, generator=generator)}
    glob, tensor, row = (Mask.top_k(scores, 0.2, scope) for scope in ("global", "tensor", "row"))
    assert glob.selected == tensor.selected == 16 and row.selected == 6 * 2 + 4 * 1
    assert glob.tensors["small"].sum() < tensor.tensors["small"].sum() == 4
    assert row.tensors["big"].sum(1).tolist() == [2] * 6
    # conv-like 4-D weights: a row is everything of one output channel
    conv = {"c": torch.randn(3, 2, 2, 2, generator=generator)}
    assert Mask.top_k(conv, 0.25, "row").tensors["c"].reshape(3, -1).sum(1).tolist() == [2, 2, 2]


def test_metadata_of_selection():
    mask = Mask.top_k({"w": torch.arange(4.0)}, 0.5, "tensor", metadata={"score": "saliency"})
    assert mask.metadata["scope"] == "tensor"
    assert float(mask.metadata["ratio"]) == 0.5
    assert mask.metadata["score"] == "saliency"


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.1, float("nan"), 1.0000001, "0.5", None])
def test_ratio_out_of_range(ratio):
    with pytest.raises(SafeEditError, match="ratio"):
        Mask.top_k({"w": torch.randn(4)}, ratio)


@pytest.mark.parametrize("scope", ["global", "tensor", "row"])
def test_ratio_one_selects_everything(scope):
    scores = {"w": torch.randn(3, 4), "v": torch.full((5,), float("-inf"))}
    mask = Mask.top_k(scores, 1.0, scope)
    assert mask.selected == mask.total == 17
    assert mask.density == 1.0


def test_unknown_scope():
    with pytest.raises(SafeEditError, match="scope"):
        Mask.top_k({"w": torch.randn(4)}, 0.5, "layer")


def test_nan_scores():
    with pytest.raises(SafeEditError, match=r"'v'.*NaN"):
        Mask.top_k({"w": torch.randn(4), "v": torch.tensor([1.0, float("nan")])}, 0.5)


def test_empty_and_integer_scores():
    with pytest.raises(SafeEditError, match="no scores"):
        Mask.top_k({}, 0.5)
    with pytest.raises(SafeEditError, match="floating point"):
        Mask.top_k({"w": torch.arange(4)}, 0.5)


def test_non_bool_mask_rejected():
    with pytest.raises(SafeEditError, match="bool"):
        Mask({"w": torch.ones(3)})


# --- set operations and summaries -----------------------------------------------------------------------------------


def make(values: dict[str, list]) -> Mask:
    return Mask({name: torch.tensor(v, dtype=torch.bool) for name, v in values.items()})


def test_set_operations_against_hand_computation():
    a = make({"x": [[1, 1, 0], [0, 1, 0]], "y": [1, 0, 1, 0]})
    b = make({"x": [[0, 1, 1], [0, 1, 1]], "z": [1, 1]})
    union, inter, diff, comp = a | b, a & b, a - b, ~a
    assert union.tensors["x"].int().tolist() == [[1, 1, 1], [0, 1, 1]]
    assert union.tensors["y"].int().tolist() == [1, 0, 1, 0]
    assert union.tensors["z"].int().tolist() == [1, 1]
    assert inter.tensors["x"].int().tolist() == [[0, 1, 0], [0, 1, 0]]
    assert inter.tensors["y"].int().tolist() == [0, 0, 0, 0] and inter.tensors["z"].int().tolist() == [0, 0]
    assert diff.tensors["x"].int().tolist() == [[1, 0, 0], [0, 0, 0]]
    assert diff.tensors["y"].int().tolist() == [1, 0, 1, 0] and diff.tensors["z"].int().tolist() == [0, 0]
    assert set(comp.tensors) == {"x", "y"}
    assert comp.tensors["x"].int().tolist() == [[0, 0, 1], [1, 0, 1]]
    assert comp.tensors["y"].int().tolist() == [0, 1, 0, 1]
    # |A ∩ B| = 2, |A ∪ B| = 5 + 2 + 2 = 9
    assert a.jaccard(b) == pytest.approx(2 / 9)
    assert b.jaccard(a) == pytest.approx(2 / 9)
    assert a.jaccard(a) == 1.0
    assert a.jaccard(~a) == 0.0
    empty = make({"x": [0, 0]})
    assert empty.jaccard(empty) == 1.0
    # operands are not modified
    assert a.tensors["x"].int().tolist() == [[1, 1, 0], [0, 1, 0]]


def test_set_operations_reject_shape_mismatch():
    a = make({"x": [[1, 0, 1], [0, 0, 1]]})
    b = make({"x": [[1, 0], [0, 1], [1, 1]]})
    for op in (lambda: a | b, lambda: a & b, lambda: a - b, lambda: a.jaccard(b)):
        with pytest.raises(SafeEditError, match="shape"):
            op()


def test_layer_stats_and_summary():
    mask = make({"x": [[1, 1, 0], [0, 1, 0]], "y": [0, 0, 0, 0], "z": [1]})
    assert mask.layer_stats() == [
        {"name": "x", "selected": 3, "total": 6, "density": 0.5},
        {"name": "y", "selected": 0, "total": 4, "density": 0.0},
        {"name": "z", "selected": 1, "total": 1, "density": 1.0},
    ]
    assert (mask.selected, mask.total) == (4, 11)
    assert mask.density == pytest.approx(4 / 11)
    assert mask.summary()["layers"] == mask.layer_stats()


def test_full_mask():
    model = nn.Linear(3, 2)
    full = Mask.full(dict(model.named_parameters()))
    assert full.selected == full.total == 8
    none = Mask.full({"w": torch.Size([2, 2])}, value=False)
    assert none.selected == 0 and none.tensors["w"].shape == (2, 2)


def test_check_matches():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    ok = Mask({"0.weight": torch.ones(2, 3, dtype=torch.bool)})
    ok.check_matches(model)
    ok.check_matches(dict(model.named_parameters()))
    with pytest.raises(SafeEditError, match=r"'1\.weight'.*names no parameter"):
        Mask({"1.weight": torch.ones(2, 3, dtype=torch.bool)}).check_matches(model)
    with pytest.raises(SafeEditError, match=r"'2\.weight'.*shape \(2, 1\).*\(1, 2\)"):
        Mask({"2.weight": torch.ones(2, 1, dtype=torch.bool)}).check_matches(model)
    with pytest.raises(SafeEditError, match="shape"):
        Mask({"0.weight": torch.ones(6, dtype=torch.bool)}).check_matches({"0.weight": torch.zeros(2, 3)})


# --- safetensors I/O -------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    scores = {"layer.1.weight": torch.randn(4, 6, generator=generator), "bias": torch.randn(5, generator=generator)}
    mask = Mask.top_k(scores, 0.3, "row", metadata={"source_weights_sha256": "ab" * 32, "score": "wagle"})
    path = tmp_path / "sub" / "mask.safetensors"
    mask.save(path)
    loaded = Mask.load(path)
    assert loaded.tensors.keys() == mask.tensors.keys()
    for name, tensor in mask.tensors.items():
        assert loaded.tensors[name].dtype == torch.bool
        assert torch.equal(loaded.tensors[name], tensor)
    assert loaded.metadata == mask.metadata
    assert loaded.metadata["source_weights_sha256"] == "ab" * 32
    assert loaded.metadata["scope"] == "row" and float(loaded.metadata["ratio"]) == 0.3
    assert loaded.selected == mask.selected
    assert [p.name for p in path.parent.iterdir()] == ["mask.safetensors"]  # no temporary files left behind


def test_load_plain_safetensors_is_not_a_mask(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path))
    with pytest.raises(SafeEditError, match="not a safeedit mask"):
        Mask.load(path)
    save_file({"w": torch.ones(2, dtype=torch.bool)}, str(path), metadata={"format": "other"})
    with pytest.raises(SafeEditError, match="not a safeedit mask"):
        Mask.load(path)


def _touch(path: str) -> str:
    Path(path).write_text("unpickled")
    return path


class _Tripwire:
    """Unpickling this object writes a file: evidence that a loader ran pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".PTH", ".safetensors"])
def test_load_never_unpickles(tmp_path, suffix):
    marker = tmp_path / "marker"
    pickled = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.ones(2, dtype=torch.bool), "trip": _Tripwire(str(marker))}, pickled)
    path = tmp_path / f"mask{suffix}"
    path.write_bytes(pickled.read_bytes())
    match = "pickle" if suffix != ".safetensors" else "safetensors"
    with pytest.raises(SafeEditError, match=match):
        Mask.load(path)
    assert not marker.exists(), "the file was unpickled"
    torch.load(pickled, weights_only=False)  # negative control: the tripwire does fire when unpickled
    assert marker.exists()


@pytest.mark.parametrize("seed", range(4))
def test_corrupt_safetensors(tmp_path, seed):
    path = tmp_path / "mask.safetensors"
    path.write_bytes(random.Random(seed).randbytes(64 + 97 * seed))
    with pytest.raises(SafeEditError):
        Mask.load(path)


def test_truncated_empty_and_missing_files(tmp_path):
    good = tmp_path / "good.safetensors"
    Mask.top_k({"w": torch.randn(50)}, 0.5).save(good)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[:-20],
        "header_only.safetensors": data[:12],
        "empty.safetensors": b"",
        "huge_header.safetensors": (2**40).to_bytes(8, "little") + b"{}",
        "bad_json.safetensors": (10).to_bytes(8, "little") + b"not json!!",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SafeEditError):
            Mask.load(tmp_path / name)
    with pytest.raises(SafeEditError, match="no such file"):
        Mask.load(tmp_path / "missing.safetensors")
