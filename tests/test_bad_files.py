"""Careless and hostile files: a broken data file or weights file gives one line that names it and the fix.

Every case runs where a user meets it (the Python API and the command line, `scores` and `mask`) and checks the
same contract: exit status 2 (or a SafeEditError), one line on standard error, no traceback, the input file
untouched, and no output written.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import word_tokenizer

from safeedit.cli import main
from safeedit.data import load_data, make_loader
from safeedit.errors import SafeEditError
from safeedit.models import load_model
from safeedit.models.language import load_language_model

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"]


def _tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT classifier and a tiny Llama, each saved with its tokenizer like any Hugging Face folder."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    built = {
        "bert": BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=16)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)),
    }
    for name, model in built.items():
        model.save_pretrained(root / name, safe_serialization=True)
        _tokenizer().save_pretrained(root / name)
    return {name: root / name for name in built}


@pytest.fixture(scope="module", autouse=True)
def _module_cache(cache):
    yield cache


def refused(command: str, model: str | Path, data: str | Path, tmp_path: Path, capfd) -> str:
    """Run `command` on `model` and `data`; check the one-line contract and return the line."""
    out = tmp_path / "out" / "result.safetensors"
    extra = ["--ratio", "0.5"] if command == "mask" else []
    capfd.readouterr()  # only this command's output counts
    code = main([command, "--model", str(model), "--score", "saliency", "--forget", str(data), "--out", str(out),
                 "--quiet", *extra])
    _, stderr = capfd.readouterr()
    assert code == 2, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safeedit: error: "), stderr
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    return lines[0]


# --- data files the builders cannot read -------------------------------------------------------------------------

BAD_DATA = {  # name: (file name, bytes, words the message must hold besides the file name)
    "jsonl line not json": ("d.jsonl", b'{"text": "a b", "label": 0}\nnot json\n', ["line 2", "fix or remove"]),
    "jsonl first line": ("d.jsonl", b'{"text": "a b", "label": 0\n', ["line 1", "fix or remove"]),
    "jsonl line a list": ("d.jsonl", b'{"text": "a", "label": 0}\n[1, 2]\n', ["line 2", "object per line"]),
    "jsonl 0 bytes": ("d.jsonl", b"", ["empty", "one JSON object per line"]),
    "jsonl blank lines": ("d.jsonl", b"\n\n   \n", ["empty", "one JSON object per line"]),
    "jsonl not utf-8": ("d.jsonl", b'\xff\xfe{\x00"\x00', ["UTF-8", "re-save"]),
    "csv ragged row": ("d.csv", b"text,label\na b,0\nc,1,5,6\n", ["line 3", "4 fields", "quote fields"]),
    "csv open quote": ("d.csv", b'text,label\n"a b,0\nc,1\n', ["line 2", "balance its quotes"]),
    "csv header only": ("d.csv", b"text,label\n", ["no rows", "add one example"]),
    "csv 0 bytes": ("d.csv", b"", ["empty", "header line"]),
    "json cut": ("d.json", b'[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]', ["line 2", "fix it"]),
    "parquet garbage": ("d.parquet", b"PAR1 not really parquet", ["Parquet", "write the file again"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_broken_data_file_is_one_line_naming_it(case, models, tmp_path, capfd):
    name, content, words = BAD_DATA[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SafeEditError) as error:
        load_data(str(path))
    assert str(path) in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    for command in ("scores", "mask"):
        line = refused(command, models["bert"], path, tmp_path, capfd)
        assert str(path) in line and all(w in line for w in words), line
    assert path.read_bytes() == content


def test_broken_file_inside_a_data_folder_is_named(models, tmp_path, capfd):
    folder = tmp_path / "data"
    folder.mkdir()
    good, bad = b'{"text": "a", "label": 0}\n', b'{"text": "b", "label": 1}\n{"text": \n'
    (folder / "a.jsonl").write_bytes(good)
    (folder / "b.jsonl").write_bytes(bad)
    line = refused("scores", models["bert"], folder, tmp_path, capfd)
    assert str(folder / "b.jsonl") in line and "line 2" in line and "fix or remove" in line
    assert (folder / "a.jsonl").read_bytes() == good and (folder / "b.jsonl").read_bytes() == bad


def test_damaged_saved_data_set_is_named(tmp_path, capfd):
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(folder))
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    content = arrow.read_bytes()
    line = refused("scores", "digits-cnn", folder, tmp_path, capfd)
    assert str(folder) in line and "save_to_disk" in line
    assert arrow.read_bytes() == content


def test_undecodable_image_is_named_when_batches_are_drawn(tmp_path, capfd):
    """Images decode lazily, batch by batch: a broken file must still surface as one line naming it."""
    from PIL import Image

    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "good.png")
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut here")
    line = refused("scores", "digits-cnn", folder.parent, tmp_path, capfd)
    assert str(broken) in line and "re-save or remove" in line
    assert broken.read_bytes() == b"\x89PNG\r\n\x1a\n cut here"


@pytest.mark.parametrize("name, content, kind", [
    ("mixed.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": "x"}\n', "values of mixed types (e.g. 'x')"),
    ("words.csv", b"text,label\na,pos\nb,neg\n", "text (e.g. 'pos')"),
])
def test_labels_that_are_not_numbers(name, content, kind, models, tmp_path, capfd):
    path = tmp_path / name
    path.write_bytes(content)
    line = refused("scores", models["bert"], path, tmp_path, capfd)
    assert f"column 'label' of data {str(path)!r} holds {kind}" in line and "integer" in line
    assert path.read_bytes() == content


# --- data that no forward pass could read --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bert", "digits-cnn"])
def test_data_without_an_input_column(model, models, tmp_path, capfd):
    path = tmp_path / "labels.csv"
    content = b"foo,label\nx,0\ny,1\n"
    path.write_bytes(content)
    spec = str(models.get(model, model))
    loaded = load_model(spec, progress=False)
    with pytest.raises(SafeEditError, match=r"no input column.*rename"):
        make_loader(load_data(str(path)), loaded.model, loaded.tokenizer)
    for command in ("scores", "mask"):
        line = refused(command, spec, path, tmp_path, capfd)
        assert str(path) in line and "foo, label" in line and "rename its input column to 'text'" in line
    assert path.read_bytes() == content


MISMATCH = {  # model, data, what the model reads, what the data has
    "bert on digits": ("bert", "digits:train[label=3]", "reads text", "has images"),
    "llama on digits": ("llama", "digits", "reads text", "has images"),
    "cnn on text": ("digits-cnn", "text.csv", "reads images", "has text"),
}


@pytest.mark.parametrize("case", sorted(MISMATCH))
def test_modality_mismatch_names_model_and_data(case, models, tmp_path, capfd):
    model, data, reads, has = MISMATCH[case]
    if data.endswith(".csv"):
        (tmp_path / data).write_text("text,label\na b,0\nc,1\n")
        data = str(tmp_path / data)
    spec = str(models.get(model, model))
    loaded = load_model(spec, progress=False)
    with pytest.raises(SafeEditError, match=f"model {spec} {reads}; data '.*' {has}"):
        make_loader(load_data(data), loaded.model, loaded.tokenizer)
    for command in ("scores", "mask"):
        line = refused(command, spec, data, tmp_path, capfd)
        assert f"model {spec} {reads}" in line and f"data {data!r} {has}" in line and "give data with" in line


# --- weights files that are not safetensors ----------------------------------------------------------------------


class _Tripwire:
    """Unpickling this writes a file: the test proves nothing was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _bad_weights(kind: str, good: bytes, tripwire: Path) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "header only":
        return good[: 8 + int.from_bytes(good[:8], "little")]
    if kind == "empty":
        return b""
    if kind == "pickle":
        return pickle.dumps({"w": _Tripwire(tripwire)}, protocol=2)
    buffer = io.BytesIO()  # "torch.save": today's zip archive around a pickle
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["truncated", "header only", "empty", "pickle", "torch.save"])
def test_broken_safetensors_in_a_model_folder(kind, models, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(models["llama"], folder)
    weights = folder / "model.safetensors"
    tripwire = tmp_path / "unpickled"
    content = _bad_weights(kind, weights.read_bytes(), tripwire)
    weights.write_bytes(content)
    (tmp_path / "forget.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    fix = "re-save the model with save_pretrained(safe_serialization=True)"
    for load in (load_model, load_language_model):
        with pytest.raises(SafeEditError) as error:
            load(str(folder), progress=False)
        message = str(error.value)
        assert message.startswith(f"{weights} is not a valid safetensors file") and fix in message, message
    for command in ("scores", "mask"):
        line = refused(command, folder, tmp_path / "forget.jsonl", tmp_path, capfd)
        assert str(weights) in line and fix in line
    assert weights.read_bytes() == content
    assert not tripwire.exists()
