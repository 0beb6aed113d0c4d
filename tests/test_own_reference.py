"""A reference that means "trained without the data" for a user's fine-tuned classifier (issue 18, part 2): the base
checkpoint fine-tuned on the retain rows (`reference: {from: BASE}`), a model the user already trained
(`reference: {model: PATH}`), or none; a recipe or reference that cannot work is one line before anything loads.
The example scenario runs end to end on the tiny files `tests/tiny_reference.py` builds."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as H
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_reference import FORGET, SEED, TEST_SPLIT, bert_config, build

from safeedit.cli import main
from safeedit.data.forget import ForgetRequest, fingerprint, split_forget
from safeedit.data.sources import load_train_test
from safeedit.io import sha256_file
from safeedit.models import load_model
from safeedit.scenario import load_scenario
from safeedit.unlearn.reference import FROM_SCRATCH, NONE

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "scenarios" / "examples" / "forget-customer-reference.yaml"
FOLDER = Path("examples/reference")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The example's files, and models that cannot be its reference (config.json alone: they must be refused
    before any weights are read)."""
    from transformers import BertForSequenceClassification, LlamaConfig

    root = tmp_path_factory.mktemp("reference")
    build(root)
    wrong = root / "wrong"
    labels = bert_config(num_labels=3)
    labels.architectures = [BertForSequenceClassification.__name__]
    labels.save_pretrained(wrong / "three-labels")
    wider = bert_config(hidden_size=16)
    wider.architectures = [BertForSequenceClassification.__name__]
    wider.save_pretrained(wrong / "wider")
    wider.architectures = ["BertModel"]
    wider.save_pretrained(wrong / "wider-base")
    llama = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    llama.architectures = ["LlamaModel"]
    llama.save_pretrained(wrong / "llama-base")
    save_file({"conv.weight": torch.zeros(2, 2)}, wrong / "not-a-cnn.safetensors")
    return root


def example(**changes) -> dict:
    scenario = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        if value is ...:
            scenario.pop(key, None)
        else:
            scenario[key] = value
    return scenario


def run(scenario: dict, where: Path, out: Path, *flags: str) -> int:
    (where / "scenario.yaml").write_text(yaml.safe_dump(scenario))
    return main([*flags, "run", str(where / "scenario.yaml"), "--out", str(out), "--no-pdf"])


def retain_rows(root: Path):
    """The retain rows, as the scenario's data section and forget request make them (independently of a run)."""
    train, _, _ = load_train_test(str(root / FOLDER / "tickets.csv"), "train", TEST_SPLIT, SEED)
    return split_forget(train, ForgetRequest(kind="ids", column="customer_id", ids=[FORGET])).retain


def outputs(record: dict, run_dir: Path, role: str) -> dict[str, torch.Tensor]:
    """The tensors of the output with `role` (a safetensors file, or the safetensors of a model folder)."""
    path = run_dir / next(entry["path"] for entry in record["outputs"] if entry["role"] == role)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


def test_from_base_fine_tunes_the_base_on_the_retain_rows_only(built, tmp_path, monkeypatch, capsys):
    from transformers import BertForSequenceClassification

    monkeypatch.chdir(built)
    assert main(["-q", "run", str(EXAMPLE), "--out", str(tmp_path / "run"), "--no-pdf"]) == 0, capsys.readouterr()
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    reference = record["reference"]
    assert reference["kind"] == "fine-tuned-from-base" and reference["source"] == str(FOLDER / "base")
    assert reference["recipe"] == {"epochs": 3, "lr": 0.01, "batch_size": 8, "weight_decay": 0.0,
                                   "optimizer": "AdamW"}
    assert reference["seed"] == record["results"]["retrain"]["seed"] == 0 + 1000
    assert reference["initialised"] == ["classifier.weight", "classifier.bias"]
    # trained on exactly the retain rows: none of C007's rows
    retain = retain_rows(built)
    assert FORGET not in set(retain["customer_id"]) and len(retain) == record["data"]["retain"]["count"]
    assert reference["trained_on"]["retain"] == fingerprint(retain) == record["data"]["retain"]
    assert reference["trained_on"]["retain"]["count"] + record["data"]["forget"]["count"] == 60
    # its weights come from the base, not from a random initialisation: position embeddings of positions the tickets
    # never reach get no gradient, so they are the base's bit for bit; the rest was trained
    weights = outputs(record, tmp_path / "run", "reference model folder")
    base = load_file(built / FOLDER / "base" / "model.safetensors")
    name = "embeddings.position_embeddings.weight"
    assert torch.equal(weights[f"bert.{name}"][16:], base[name][16:])
    torch.manual_seed(reference["seed"])  # where `from: scratch` would have started
    scratch = BertForSequenceClassification(bert_config(num_labels=2)).state_dict()
    assert (weights[f"bert.{name}"][16:] - scratch[f"bert.{name}"][16:]).abs().max() > 0.01
    changed = weights["bert.encoder.layer.0.output.dense.weight"] - base["encoder.layer.0.output.dense.weight"]
    assert changed.abs().max() > 1e-3  # fine-tuned, not merely copied
    inputs = {entry["role"]: entry for entry in record["inputs"]}
    assert inputs["reference base weights"]["sha256"] == sha256_file(built / FOLDER / "base" / "model.safetensors")
    methods = record["results"]
    assert {"original", "retrain", "ft", "ga"} == set(methods)
    assert all(0 <= methods[m]["metrics"]["after"]["gap_to_retrain"] <= 1 for m in ("ft", "ga"))
    assert all(methods[m]["metrics"]["after"]["time_vs_retrain"] > 0 for m in ("ft", "ga"))
    assert "base checkpoint fine-tuned" in methods["retrain"]["about"]["summary"]
    assert "base checkpoint fine-tuned" in (tmp_path / "run" / "retrain" / "README.md").read_text()  # its card too
    note = next(n for n in record["notes"] if n.startswith("Reference:"))
    assert "examples/reference/base fine-tuned on the 55 retain examples only" in note
    html = (tmp_path / "run" / "report.html").read_text()
    assert "reference (base fine-tuned without the data)" in html and "never the forget examples" in html
    assert main(["verify", str(tmp_path / "run")]) == 0
    # the reference and each edited model are folders from_pretrained loads as they are
    for name in ("retrain", "ft"):
        assert H.changed_tensors_of_loaded_folder(record, tmp_path / "run", name, "AutoModelForSequenceClassification",
                                                  built / FOLDER / "ticket-classifier") > 0, name


def test_model_loads_evaluates_and_hashes_the_given_reference(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(built)
    given = FOLDER / "reference-model"
    scenario = example(reference={"model": str(given)}, methods={"ga": {"epochs": 1, "lr": 1e-3, "batch_size": 8}})
    assert run(scenario, tmp_path, tmp_path / "run", "-q") == 0, capsys.readouterr()
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["reference"] == {"kind": "given", "source": str(given),
                                   "weights_sha256": load_model(str(given)).weights_sha256}
    inputs = {entry["role"]: entry for entry in record["inputs"]}
    assert inputs["reference weights"] == {"path": str(given / "model.safetensors"), "role": "reference weights",
                                           "sha256": sha256_file(given / "model.safetensors")}
    assert not any(entry["role"] == "reference weights" for entry in record["outputs"])  # an input, not re-written
    retrain, ga = record["results"]["retrain"], record["results"]["ga"]["metrics"]["after"]
    assert retrain["wall_time_s"] is None and "given" in retrain["about"]["summary"]
    assert "gap_to_retrain" in ga and "time_vs_retrain" not in ga  # its training time is unknown
    assert any("time vs retrain is not measured" in note for note in record["notes"])
    assert "reference (given, trained without the data)" in (tmp_path / "run" / "report.html").read_text()
    assert main(["verify", str(tmp_path / "run")]) == 0


def test_none_runs_without_a_reference_and_says_what_is_missing(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(built)
    scenario = example(reference="none", methods={"ga": {"epochs": 1, "lr": 1e-3, "batch_size": 8}})
    assert run(scenario, tmp_path, tmp_path / "run", "-q") == 0, capsys.readouterr()
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["reference"] == {"kind": "none"} and set(record["results"]) == {"original", "ga"}
    assert not {"gap_to_retrain", "time_vs_retrain"} & set(record["results"]["ga"]["metrics"]["after"])
    note = next(n for n in record["notes"] if n.startswith("No reference model"))
    assert "gap to retrain and time vs retrain are not measured" in note
    assert note in (tmp_path / "run" / "report.html").read_text()  # the report says it (no quotes to escape)
    assert main(["verify", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("stated, kind", [({"reference": "none"}, NONE), ({"reference": None}, NONE),
                                          ({"retrain": None}, NONE), ({"retrain": {"epochs": 2}}, FROM_SCRATCH),
                                          ({}, FROM_SCRATCH)])
def test_reference_spellings_and_the_older_retrain(stated, kind, tmp_path):
    """`none` and null are no reference; `retrain:` still states a from-scratch reference and is recorded as
    stated; an embedded model with nothing stated retrains from scratch with its own recipe."""
    base = {"name": "q", "request": {"what": "the digit 3"}, "model": {"name": "digits-cnn"},
            "data": {"source": "digits"}, "forget": {"kind": "class", "label": 3}, "methods": {"ga": None}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**base, **stated}))
    scenario = load_scenario(tmp_path / "s.yaml")
    plan = scenario.reference_plan()
    assert plan.kind == kind
    dumped = scenario.model_dump(mode="json")
    assert ("retrain" in dumped) == ("retrain" in stated) and ("reference" in dumped) != ("retrain" in stated)
    assert type(scenario)(**dumped).model_dump(mode="json") == dumped  # a record's scenario reads back the same
    if kind == FROM_SCRATCH:
        assert plan.recipe()["epochs"] == stated.get("retrain", {}).get("epochs", 20)  # digits-cnn's own: 20


def _one_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("safeedit") and "Traceback" not in err, err
    assert not out.strip(), out
    return lines[0]


@pytest.mark.parametrize("changes, fragments", [
    ({"reference": {"from": "examples/reference/base"}},
     ("reference: fine-tuning examples/reference/base needs a recipe", "reference.epochs and reference.lr")),
    ({"reference": {"from": "examples/reference/base", "epochs": 2}}, ("needs a recipe", "reference.lr")),
    ({"reference": {"from": "examples/reference/base", "epochs": 0, "lr": 0.1}}, ("reference.epochs",)),
    ({"reference": ...}, ("is not embedded, so say what it is compared with", "reference: {from: BASE",
                          "reference: {model: PATH}", "reference: none")),
    ({"reference": {"from": "scratch"}}, ("from scratch needs a recipe", "reference.epochs")),
    ({"reference": {"from": "examples/reference/base", "model": "examples/reference/reference-model"}},
     ("not both",)),
    ({"reference": {"from": "examples/reference/nope", "epochs": 1, "lr": 0.1}},
     ("reference.from: examples/reference/nope: no such folder",)),
    ({"reference": {"model": "examples/reference/nope"}},
     ("reference.model: examples/reference/nope: no such folder",)),
    ({"reference": {"model": "examples/reference/tickets.csv"}}, ("reference.model", "is a file")),
    ({"reference": {"model": "examples/reference/reference-model", "epochs": 2}}, ("reference.epochs", "no recipe")),
    ({"retrain": {"epochs": 2, "lr": 0.1}}, ("give reference: only", "older name")),
    ({"reference": "examples/reference/reference-model"},
     ("reference: 'examples/reference/reference-model' is not understood",
      "reference: {model: examples/reference/reference-model}")),
])
def test_a_reference_that_cannot_work_is_one_line_before_anything_loads(built, tmp_path, monkeypatch, capsys,
                                                                         changes, fragments):
    monkeypatch.chdir(built)

    def started(job):
        raise AssertionError("the scenario passed validation; it should have been refused")

    monkeypatch.setattr("safeedit.runners.run_job", started)
    assert run(example(**changes), tmp_path, tmp_path / "run") == 2
    line = _one_line(capsys)
    assert all(fragment in line for fragment in fragments), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, reference, fragments", [
    ("examples/reference/ticket-classifier", {"model": "wrong/three-labels"},
     ("reference.model: wrong/three-labels does not match", "num_labels 3 vs 2", "same architecture and labels")),
    ("examples/reference/ticket-classifier", {"model": "wrong/wider"},
     ("reference.model", "parameter 'bert.embeddings.word_embeddings.weight' is [10, 16], the model's [10, 8]",)),
    ("examples/reference/ticket-classifier", {"model": "examples/reference/base"},
     ("reference.model", "architecture BertModel vs BertForSequenceClassification")),
    ("examples/reference/ticket-classifier", {"from": "wrong/wider-base", "epochs": 1, "lr": 0.1},
     ("reference.from: wrong/wider-base does not match", "[10, 16]", "checkpoint the model was fine-tuned from")),
    ("examples/reference/ticket-classifier", {"from": "wrong/llama-base", "epochs": 1, "lr": 0.1},
     ("reference.from", "config class LlamaConfig vs BertConfig")),
    ("digits-cnn", {"model": "wrong/not-a-cnn.safetensors"},
     ("reference.model: wrong/not-a-cnn.safetensors does not match the model digits-cnn", "only in the model")),
])
def test_a_reference_of_another_architecture_is_one_line_before_the_model_loads(built, tmp_path, monkeypatch,
                                                                                capsys, model, reference, fragments):
    """Found from configurations (and a safetensors header) alone: no model is loaded, nothing trained."""
    monkeypatch.chdir(built)

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the reference was checked")

    monkeypatch.setattr("safeedit.runners.classification.load_model", loaded)
    changes = {"model": {"name": model}, "reference": reference}
    if model == "digits-cnn":
        changes.update(data={"source": "digits"}, forget={"kind": "class", "label": 3})
    assert run(example(**changes), tmp_path, tmp_path / "run") == 2
    line = _one_line(capsys)
    assert all(fragment in line for fragment in fragments), line
    assert not (tmp_path / "run").exists()


def test_the_builder_writes_safetensors_folders_the_loader_accepts(built):
    for name in ("base", "ticket-classifier", "reference-model"):
        folder = built / FOLDER / name
        with safe_open(str(folder / "model.safetensors"), framework="pt"):
            pass
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
