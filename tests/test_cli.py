"""The command line: the quick-start path, any Hugging Face model from a folder, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import helpers as H
import pytest
import torch
from safetensors.torch import save_file

from safeedit.cli import main
from safeedit.io import load_safetensors, sha256_file
from safeedit.masks import Mask, target_count


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_mask_on_embedded_digits(cache, tmp_path, capsys):
    out = tmp_path / "mask.safetensors"
    code, stdout, _ = run(
        ["mask", "--model", "digits-cnn", "--score", "saliency", "--forget", "digits:train[label=3]",
         "--ratio", "0.25", "--out", out, "--quiet", "--threads", "1"],
        capsys,
    )
    assert code == 0
    mask = Mask.load(out)
    assert mask.selected == target_count(0.25, mask.total)
    assert mask.metadata["score"] == "saliency"
    assert mask.metadata["data_forget"] == "digits:train[label=3]"
    assert mask.metadata["examples_forget"] == "146"  # training images of the digit 3 in the fixed split
    assert len(mask.metadata["source_weights_sha256"]) == 64
    assert "25.0%" in stdout
    # the same request again gives the same mask, bit for bit
    again = tmp_path / "again.safetensors"
    run(["mask", "--model", "digits-cnn", "--score", "saliency", "--forget", "digits:train[label=3]",
         "--ratio", "0.25", "--out", again, "--quiet"], capsys)
    assert all(torch.equal(mask.tensors[n], Mask.load(again).tensors[n]) for n in mask.tensors)
    assert sha256_file(again) == sha256_file(out)  # same bytes, so the same hash in any record


def test_scores_then_mask_from_file_and_inspect(cache, tmp_path, capsys):
    scores_path = tmp_path / "fisher.safetensors"
    code, _, _ = run(["scores", "--model", "digits-cnn", "--score", "fisher", "--data", "digits:test",
                      "--include", r"\.weight$", "--out", scores_path, "--quiet"], capsys)
    assert code == 0
    scores, metadata = load_safetensors(scores_path)
    assert all(name.endswith(".weight") for name in scores) and metadata["score"] == "fisher"
    row_mask = tmp_path / "row.safetensors"
    code, _, _ = run(["mask", "--scores", scores_path, "--ratio", "0.1", "--scope", "row", "--out", row_mask,
                      "--model", "digits-cnn"], capsys)
    assert code == 0
    mask = Mask.load(row_mask)
    head = mask.tensors["classifier.weight"]  # 10 rows of 64 inputs: round(6.4) = 6 per row
    assert head.sum(dim=1).tolist() == [6] * 10
    code, stdout, _ = run(["inspect", row_mask, "--compare", row_mask, "--model", "digits-cnn", "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["jaccard"] == 1.0 and report["selected"] == mask.selected


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved like any Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the author was born in paris wrote books about cats and dogs loves tea coffee rain".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    forget = folder / "forget.jsonl"
    forget.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in
                                enumerate(["the author was born in paris", "the author wrote books about cats"])))
    retain = folder / "retain.jsonl"
    retain.write_text("\n".join(json.dumps({"id": 10 + i, "text": t}) for i, t in
                                enumerate(["the author loves tea", "dogs and cats love rain", "coffee and tea"])))
    return folder


def test_wagle_mask_on_a_transformers_folder(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "wagle.safetensors"
    folder = tiny_llama_folder
    code, _, err = run(["mask", "--model", folder, "--score", "wagle", "--forget", folder / "forget.jsonl",
                        "--retain", folder / "retain.jsonl", "--option", "gamma=0.5", "--include", "mlp",
                        "--ratio", "0.05", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    mask = Mask.load(out)
    assert mask.tensors and all(".mlp." in name for name in mask.tensors)
    assert mask.selected == target_count(0.05, mask.total)
    assert json.loads(mask.metadata["options"]) == {"gamma": 0.5}


def test_wanda_row_mask_on_a_transformers_folder(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "wanda.safetensors"
    code, _, err = run(["mask", "--model", tiny_llama_folder, "--score", "wanda", "--calibration",
                        tiny_llama_folder / "retain.jsonl", "--include", r"self_attn\.(q|k|v|o)_proj",
                        "--ratio", "0.125", "--scope", "row", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    mask = Mask.load(out)
    assert len(mask.tensors) == 8  # 4 attention projections × 2 layers
    for tensor in mask.tensors.values():
        assert (tensor.sum(dim=1) == target_count(0.125, tensor.shape[1])).all()


BAD_INPUTS = {
    "missing data file": (["--score", "saliency", "--forget", "nope.jsonl"], "nope.jsonl"),
    "unknown score": (["--score", "sailency", "--forget", "digits:train"], "invalid choice"),
    "ratio above 1": (["--score", "saliency", "--forget", "digits:train", "--ratio", "1.5"],
                      "--ratio: 1.5 is not in (0, 1]"),
    "ratio zero": (["--score", "magnitude", "--ratio", "0"], "--ratio: 0.0 is not in (0, 1]"),
    "missing role": (["--score", "wagle", "--forget", "digits:train[label=3]"], "needs --retain"),
    "unused role": (["--score", "magnitude", "--forget", "digits:train"], "does not read --forget"),
    "unknown option": (["--score", "wagle", "--forget", "digits:train[label=3]", "--retain",
                        "digits:train[label!=3]", "--option", "gama=2"], "option 'gama'"),
    "overlapping forget/retain": (["--score", "wagle", "--forget", "digits:train[label=3]", "--retain",
                                   "digits:train"], "share 146 example id"),
    "empty forget set": (["--score", "saliency", "--forget", "digits:train[label=11]"], "has no rows"),
    "bad filter column": (["--score", "saliency", "--forget", "digits:train[colour=3]"], "filter column 'colour'"),
    "unknown split": (["--score", "saliency", "--forget", "digits:validation"], "no split 'validation'"),
    "pattern matches nothing": (["--score", "magnitude", "--include", "attention"], "match no parameter"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(case, cache, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    out = tmp_path / "mask.safetensors"
    try:
        code = main(["mask", "--model", "digits-cnn", *extra, "--out", str(out), "--quiet"])
    except SystemExit as exit_:  # argparse's own errors (unknown choices)
        code = exit_.code
    _, err = capsys.readouterr()
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists()


def test_checkpoint_errors(cache, tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    code, _, err = run(["mask", "--model", "digits-cnn", "--weights", pickled, "--score", "magnitude",
                        "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "pickled checkpoint" in err

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file at all")
    code, _, err = run(["mask", "--model", "digits-cnn", "--weights", corrupt, "--score", "magnitude",
                        "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "not a readable safetensors file" in err

    other_arch = tmp_path / "other.safetensors"
    save_file({"features.0.weight": torch.zeros(8, 1, 3, 3)}, str(other_arch))
    code, _, err = run(["mask", "--model", "digits-cnn", "--weights", other_arch, "--score", "magnitude",
                        "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "another architecture" in err

    from safeedit.models import load_model

    weights = load_model("digits-cnn").model.state_dict()
    weights["classifier.weight"] = weights["classifier.weight"].clone()
    weights["classifier.weight"][0, 0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(nan_path))
    code, _, err = run(["mask", "--model", "digits-cnn", "--weights", nan_path, "--score", "magnitude",
                        "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "NaN" in err and "classifier.weight" in err


def test_mask_shape_mismatch_against_model(cache, tiny_llama_folder, tmp_path, capsys):
    llama_mask = tmp_path / "llama.safetensors"
    assert run(["mask", "--model", tiny_llama_folder, "--score", "magnitude", "--ratio", "0.5",
                "--out", llama_mask, "--quiet"], capsys)[0] == 0
    code, _, err = run(["inspect", llama_mask, "--model", "digits-cnn"], capsys)
    assert code == 2 and "names no parameter of the model" in err

    wrong_shape = tmp_path / "wrong.safetensors"
    Mask({"classifier.weight": torch.ones(3, 3, dtype=torch.bool)}).save(wrong_shape)
    code, _, err = run(["inspect", wrong_shape, "--model", "digits-cnn"], capsys)
    assert code == 2 and "has shape (3, 3)" in err


def test_hf_folder_with_only_pickled_weights_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    code, _, err = run(["mask", "--model", tmp_path, "--score", "magnitude", "--out", tmp_path / "m.safetensors"],
                       capsys)
    assert code == 2 and "only pickled pytorch_model.bin" in err


def test_entry_point_exit_code_and_help():
    help_text = subprocess.run([sys.executable, "-m", "safeedit", "mask", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0
    for name in ("saliency", "wagle", "wanda", "fisher", "magnitude", "random", "--ratio", "--scope"):
        assert name in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "safeedit", "mask", "--model", "no/such/model", "--score",
                          "magnitude", "--out", "x.safetensors"], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("safeedit: error:")


def test_scores_under_torchrun_equal_single_process(cache, tmp_path, capsys):
    """`torchrun --nproc_per_node=2 -m safeedit scores ...` on gloo gives the single-process scores."""
    common = ["scores", "--model", "digits-cnn", "--score", "fisher", "--data", "digits:test", "--batch-size", "32",
              "--quiet", "--threads", "1"]
    single = tmp_path / "single.safetensors"
    assert run([*common, "--out", single], capsys)[0] == 0
    double = tmp_path / "double.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={H.free_port()}", "-m", "safeedit", *common, "--out", str(double)]
    code, stdout, stderr = H.launch(command, timeout_s=120)
    assert code == 0, stderr[-2000:]
    assert stdout.count("wrote ") == 1  # rank 0 alone writes
    expected, _ = load_safetensors(single)
    got, _ = load_safetensors(double)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-8)
