"""Out of core: packed-bit mask files (lazy, old format still read), sharded checkpoints read and written tensor by
tensor, streamed merges equal to the in-memory ones, and a streamed magnitude mask equal to `Mask.top_k`."""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import helpers as H
import numpy as np
import pytest
import torch
import yaml
from helpers import make_llama

from safeedit.checkpoint import INDEX, Checkpoint
from safeedit.cli import main
from safeedit.errors import SafeEditError
from safeedit.io import load_safetensors, save_safetensors, sha256_file
from safeedit.masks import PACKED_FORMAT, Mask, MaskFile, pack_bits, unpack_bits

# --- packed masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (9,), (3, 5), (2, 3, 7), (64,)])
def test_pack_bits_is_numpy_packbits_and_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.4
    packed = pack_bits(mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.reshape(-1).numpy()))  # bitorder "big"
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_packed_mask_round_trip_is_lazy_and_an_eighth_of_the_old_size(tmp_path):
    scores = {"a.weight": torch.randn(301, 97, generator=torch.Generator().manual_seed(0)),
              "b.bias": torch.randn(13, generator=torch.Generator().manual_seed(1))}  # 29197 + 13: not multiples of 8
    mask = Mask.top_k(scores, 0.3, metadata={"score": "test"})
    mask.save(tmp_path / "packed.safetensors")
    mask.save(tmp_path / "old.safetensors", packed=False)  # one bool byte per weight: the format before packing
    for name in ("packed", "old"):
        loaded = Mask.load(tmp_path / f"{name}.safetensors")
        assert isinstance(loaded.tensors, MaskFile)  # entries are read when asked for
        assert loaded.metadata == mask.metadata and loaded.selected == mask.selected
        assert all(torch.equal(loaded.tensors[n], mask.tensors[n]) for n in scores)
        assert loaded.tensors["a.weight"].dtype == torch.bool and loaded.tensors["a.weight"].shape == (301, 97)
    packed, old = ((tmp_path / f"{n}.safetensors").stat().st_size for n in ("packed", "old"))
    assert packed < old / 7
    assert Mask.load(tmp_path / "packed.safetensors").jaccard(Mask.load(tmp_path / "old.safetensors")) == 1.0


def _rewrite_metadata(path, change):
    """The file at `path` with its header's metadata changed by `change(metadata)`."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("shapes"), "without readable shapes"),
    (lambda m: m.update(shapes="{not json"), "without readable shapes"),
    (lambda m: m.update(shapes='{"w": [3, -1]}'), "without readable shapes"),
    (lambda m: m.update(shapes='{"w": [4, 5]}'), r"'w' is U8 \[2\], which does not hold the \(4, 5\) bits"),
    (lambda m: m.update(shapes='{"v": [3, 3]}'), "'v' is in the file or in its metadata shapes, not both"),
    (lambda m: m.update(format="safeedit.mask/9"), "not a safeedit mask"),
])
def test_damaged_packed_metadata_is_one_clear_line(tmp_path, change, message):
    path = tmp_path / "mask.safetensors"
    Mask({"w": torch.rand(3, 3) > 0.5}).save(path)
    _rewrite_metadata(path, change)
    with pytest.raises(SafeEditError, match=message) as error:
        Mask.load(path)
    assert "\n" not in str(error.value)


def test_inspect_reads_both_formats(tmp_path, capsys):

    mask = Mask.top_k({"w": torch.randn(10, 3)}, 0.5)
    mask.save(tmp_path / "new.safetensors")
    mask.save(tmp_path / "old.safetensors", packed=False)
    assert main(["inspect", str(tmp_path / "new.safetensors"), "--compare", str(tmp_path / "old.safetensors"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selected"] == 15 and report["jaccard"] == 1.0


# --- checkpoints read and written tensor by tensor ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    """A tiny Llama in bf16 saved in several shards, and two fine-tunes of it (different changes)."""
    root = tmp_path_factory.mktemp("llamas")
    base = make_llama(0).to(torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    for seed, name in ((1, "t1"), (2, "t2")):
        tuned = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_((torch.randn(p.shape, generator=generator) * 0.05).to(p.dtype))
        tuned.save_pretrained(root / name, max_shard_size="30KB")
    return root


def test_a_sharded_checkpoint_reads_tensor_by_tensor(llama_folders):
    assert (llama_folders / "base" / INDEX).is_file()
    checkpoint = Checkpoint(llama_folders / "base")
    state = make_llama(0).to(torch.bfloat16).state_dict()
    assert len({entry.file for entry in checkpoint.entries.values()}) > 2
    assert set(checkpoint.names) == set(state)
    for name, tensor in checkpoint.tensors():
        assert torch.equal(tensor, state[name]) and checkpoint.entries[name].dtype == torch.bfloat16


def _tensors(folder) -> dict[str, torch.Tensor]:
    return dict(Checkpoint(folder).tensors())


@pytest.mark.parametrize("arguments", [
    ["--method", "task_arithmetic", "--scale", "0.7"],
    ["--method", "ties", "--keep", "0.3"],
    ["--method", "dare", "--density", "0.5", "--seed", "3"],
    ["--method", "ties", "--keep", "0.3", "--trim", "global"],
    "mergekit",
])
def test_streamed_merge_equals_the_in_memory_merge(llama_folders, tmp_path, capsys, arguments):

    if arguments == "mergekit":  # dare_ties with weights and per-model densities: L1 rescale, sign election
        config = {"merge_method": "dare_ties", "base_model": str(llama_folders / "base"),
                  "models": [{"model": str(llama_folders / "t1"), "parameters": {"weight": 0.7, "density": 0.4}},
                             {"model": str(llama_folders / "t2"), "parameters": {"weight": 0.5}}],
                  "parameters": {"density": 0.6, "normalize": True}, "dtype": "float32"}
        (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
        arguments = ["--config", str(tmp_path / "merge.yaml")]
    else:
        arguments = [str(llama_folders / "base"), str(llama_folders / "t1"), str(llama_folders / "t2"), *arguments]
    assert main(["merge", *arguments, "--out", str(tmp_path / "memory")]) == 0
    assert main(["merge", *arguments, "--stream", "--out", str(tmp_path / "stream")]) == 0
    assert "streamed" in capsys.readouterr().out
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert memory.keys() == stream.keys()
    for name in memory:
        assert memory[name].dtype == stream[name].dtype and torch.equal(memory[name], stream[name]), name
    base = _tensors(llama_folders / "base")
    assert not torch.equal(stream["model.layers.0.mlp.up_proj.weight"].float(),
                           base["model.layers.0.mlp.up_proj.weight"].float())
    summary = json.loads((tmp_path / "stream" / "merge.json").read_text())
    recorded = json.loads((tmp_path / "memory" / "merge.json").read_text())
    assert summary["streamed"] and summary["options"] == recorded["options"]
    assert summary["merged_tensors"] == recorded["merged_tensors"]


def test_streamed_merge_writes_shards_transformers_loads(llama_folders, tmp_path):
    import transformers

    from safeedit.merge.streaming import stream_merge
    from safeedit.scenario import ModelMergeScenario

    scenario = ModelMergeScenario(kind="merge", name="s", base_model=str(llama_folders / "base"),
                                  models=[{"model": str(llama_folders / "t1")}],
                                  methods={"task_arithmetic": {"scale": 1.0}}, request={"what": "test"})
    stream_merge(scenario, tmp_path / "out", max_shard_bytes=16_000)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 3
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    t1 = transformers.LlamaForCausalLM.from_pretrained(llama_folders / "t1")
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(p, t1.state_dict()[n]) for n, p in loaded.state_dict().items())  # λ = 1: θ₀ + τ = θ₁
    with pytest.raises(SafeEditError, match="already holds"):
        stream_merge(scenario, tmp_path / "out")


def test_streamed_merge_refuses_what_it_cannot_stream(llama_folders, tmp_path):

    base, task = str(llama_folders / "base"), str(llama_folders / "t1")
    code = main(["merge", base, task, "--stream", "--pdf", "--out", str(tmp_path / "g")])
    assert code == 2 and not (tmp_path / "g").exists()
    other = make_llama(0)
    other.config.num_hidden_layers = 1
    type(other)(other.config).save_pretrained(tmp_path / "other")
    code = main(["merge", base, str(tmp_path / "other"), "--stream", "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()


# --- scores and masks streamed from a checkpoint -----------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.05, 0.5])
def test_streamed_magnitude_mask_equals_top_k_in_memory(llama_folders, tmp_path, ratio):
    from safeedit.attribution import compute_scores
    from safeedit.streaming import checkpoint_mask

    model = make_llama(0).to(torch.bfloat16)
    scores = compute_scores(model, "magnitude", include=r"\.weight$", progress=False)
    expected = Mask.top_k(scores, ratio)
    counts = checkpoint_mask(llama_folders / "base", tmp_path / "streamed.safetensors", ratio, include=r"\.weight$")
    streamed = Mask.load(tmp_path / "streamed.safetensors")
    assert streamed.tensors.keys() == expected.tensors.keys()
    assert all(torch.equal(streamed.tensors[n], expected.tensors[n]) for n in expected.tensors)
    assert counts == {"selected": expected.selected, "total": expected.total}
    assert streamed.metadata["score"] == "magnitude"
    with open(tmp_path / "streamed.safetensors", "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        assert json.loads(handle.read(length))["__metadata__"]["format"] == PACKED_FORMAT
    # the same bytes as Mask.save of the in-memory mask with the same metadata
    Mask(dict(expected.tensors), {**expected.metadata, "score": "magnitude"}).save(tmp_path / "memory.safetensors")
    assert sha256_file(tmp_path / "memory.safetensors") == sha256_file(tmp_path / "streamed.safetensors")


def test_streamed_mask_refuses_scores_that_need_data(llama_folders, tmp_path):
    from safeedit.streaming import checkpoint_mask

    with pytest.raises(SafeEditError, match="needs gradients"):
        checkpoint_mask(llama_folders / "base", tmp_path / "m.safetensors", 0.1, score="saliency")
    save_safetensors({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.safetensors")
    with pytest.raises(SafeEditError, match="NaN"):
        checkpoint_mask(tmp_path / "nan.safetensors", tmp_path / "m.safetensors", 0.5)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("include", [None, r"mlp\."])
def test_streamed_wanda_mask_equals_the_in_memory_one(llama_folders, tmp_path, include):
    """Wanda layer by layer (activations from the model offloaded block by block, weights from the checkpoint) gives
    the mask of the in-memory Wanda scores of the model loaded whole in fp32."""
    from transformers import AutoModelForCausalLM

    from safeedit.attribution import compute_scores
    from safeedit.streaming import checkpoint_mask

    folder = llama_folders / "t2"
    calibration = H.token_batches(3, [5, 3], vocab=100, seed=5)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    scores = compute_scores(whole, "wanda", {"calibration": calibration}, include=include, progress=False)
    expected = Mask.top_k(scores, 0.3)
    counts = checkpoint_mask(folder, tmp_path / "wanda.safetensors", 0.3, "wanda", include=include,
                             data={"calibration": calibration}, progress=False)
    streamed = Mask.load(tmp_path / "wanda.safetensors")
    assert streamed.tensors.keys() == expected.tensors.keys() and len(expected.tensors) >= 6
    assert all(torch.equal(streamed.tensors[n], expected.tensors[n]) for n in expected.tensors)
    assert counts == {"selected": expected.selected, "total": expected.total}
    with pytest.raises(SafeEditError, match="reads calibration data"):
        checkpoint_mask(folder, tmp_path / "none.safetensors", 0.3, "wanda")


def test_mask_stream_on_the_command_line_equals_the_in_memory_mask(llama_folders, tmp_path, capsys):
    """`safeedit mask --stream` writes the mask `safeedit mask` computes in memory from the same weights."""
    from safeedit.attribution import compute_scores

    out = tmp_path / "streamed.safetensors"
    assert main(["mask", "--stream", "--model", str(llama_folders / "t1"), "--score", "random", "--option",
                 "seed=4", "--exclude", "norm", "--ratio", "0.2", "--out", str(out)]) == 0
    assert "scope global" in capsys.readouterr().out
    model = make_llama(0).to(torch.bfloat16)
    model.load_state_dict(_tensors(llama_folders / "t1"))
    expected = Mask.top_k(compute_scores(model, "random", exclude="norm", options={"seed": 4}, progress=False), 0.2)
    streamed = Mask.load(out)
    assert streamed.tensors.keys() == expected.tensors.keys() and not any("norm" in n for n in expected.tensors)
    assert all(torch.equal(streamed.tensors[n], expected.tensors[n]) for n in expected.tensors)


def _calibration_file(tmp_path) -> Path:
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": f"{p} was born in lima and loves chess"}) + "\n"
                                   for p in ("ben okafor", "mira lund", "tomas reyes", "ana silva", "kofi mensah")))
    return calibration


def test_mask_stream_wanda_on_the_command_line_equals_the_in_memory_mask(built, tmp_path, monkeypatch, capsys):
    """`safeedit mask --stream --score wanda --calibration FILE` on a model folder with its tokenizer writes the
    mask `safeedit mask --score wanda` computes with the model loaded."""
    monkeypatch.chdir(built)
    common = ["--model", "examples/llmfiles/model", "--score", "wanda", "--calibration",
              str(_calibration_file(tmp_path)), "--batch-size", "2", "--ratio", "0.1", "-q"]
    assert main(["mask", "--stream", *common, "--out", str(tmp_path / "streamed.safetensors")]) == 0
    assert main(["mask", *common, "--out", str(tmp_path / "memory.safetensors")]) == 0
    assert capsys.readouterr().err == ""  # no loading bar, no warning under -q
    streamed, memory = (Mask.load(tmp_path / f"{name}.safetensors") for name in ("streamed", "memory"))
    assert streamed.tensors.keys() == memory.tensors.keys() and streamed.selected == memory.selected > 0
    assert all(torch.equal(streamed.tensors[n], memory.tensors[n]) for n in memory.tensors)


@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_scores_stream_writes_the_in_memory_scores_file(built, tmp_path, monkeypatch, capsys, score):
    """`safeedit scores --stream` writes, tensor by tensor, the scores `safeedit scores` computes in memory, in a
    file `safeedit mask --scores` reads."""
    monkeypatch.chdir(built)
    data = ["--calibration", str(_calibration_file(tmp_path)), "--batch-size", "2"] if score == "wanda" else []
    common = ["--model", "examples/llmfiles/model", "--score", score, *data, "-q"]
    assert main(["scores", "--stream", *common, "--out", str(tmp_path / "streamed.safetensors")]) == 0
    assert main(["scores", *common, "--out", str(tmp_path / "memory.safetensors")]) == 0
    (streamed, info), (memory, _) = (load_safetensors(tmp_path / f"{n}.safetensors") for n in ("streamed", "memory"))
    assert streamed.keys() == memory.keys() and len(memory) >= 6
    assert all(torch.equal(streamed[n], memory[n]) for n in memory)
    assert info["format"] == "safeedit.scores/1" and info["score"] == score and info["streamed"] == "true"
    assert main(["mask", "--scores", str(tmp_path / "streamed.safetensors"), "--ratio", "0.2",
                 "--out", str(tmp_path / "mask.safetensors")]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("extra, words", [
    (["--scope", "row"], "--stream selects over the whole checkpoint (--scope global)"),
    (["--score", "saliency"], "needs gradients"),
    (["--forget", "digits:train"], "--stream reads the weights from --model and magnitude reads no data"),
])
def test_mask_stream_refuses_what_it_cannot_stream_in_one_line(llama_folders, tmp_path, capsys, extra, words):
    out = tmp_path / "m.safetensors"
    assert main(["mask", "--stream", "--model", str(llama_folders / "base"), "--out", str(out), *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and words in error, error
    assert not out.exists()


# --- row scope without a sort ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (5,), (3, 4, 2), (0, 6), (4, 1)])
@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 1.0])
def test_row_scope_is_the_stable_sort_selection(shape, ratio):
    """kthvalue plus first-in-row ties picks what a stable descending sort of each row picks (heavy ties, ±0)."""
    from safeedit.masks import _select_rows, _sortable, target_count

    generator = torch.Generator().manual_seed(math.prod(shape) + int(ratio * 100))
    scores = torch.randint(-2, 3, shape, generator=generator).float() * 0.5
    scores[scores == 0] = torch.tensor([-0.0, 0.0])[torch.randint(0, 2, (int((scores == 0).sum()),),
                                                                  generator=generator)]
    rows = scores.reshape(1, -1) if scores.dim() < 2 else scores.flatten(1)
    k = target_count(ratio, rows.shape[1])
    order = torch.sort(_sortable(rows), dim=1, descending=True, stable=True).indices[:, :k]
    expected = torch.zeros(rows.shape, dtype=torch.bool).scatter_(1, order, True).view(shape)
    assert torch.equal(_select_rows(scores, ratio), expected)


@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.9])
def test_streamed_selection_with_straddling_ties_in_any_order(ratio):
    """Scores with few distinct values (ties across tensors at the threshold): every tensor's mask, asked for in
    reverse name order, equals `Mask.top_k`'s; the scores are read a bounded number of times."""
    from safeedit.masks import StreamedSelection

    generator = torch.Generator().manual_seed(int(ratio * 100))
    scores = {f"t{i}": torch.randint(0, 4, (5 + i, 3), generator=generator).float() for i in range(6)}
    reads = []
    selection = StreamedSelection({n: tuple(t.shape) for n, t in scores.items()},
                                  lambda name: reads.append(name) or scores[name], ratio)
    expected = Mask.top_k(scores, ratio)
    for name in sorted(scores, reverse=True):
        assert torch.equal(selection.mask(name), expected.tensors[name]), name
    assert len(reads) <= 4 * len(scores) + 1  # (+1: the first tensor once more, for its device)
