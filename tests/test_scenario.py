"""Scenarios: strict schema with clear errors, a full run's record and its hashes, any transformers classifier."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Value

from safeedit.cli import main
from safeedit.errors import SafeEditError
from safeedit.io import sha256_file
from safeedit.masks import Mask
from safeedit.runners import run_scenario
from safeedit.scenario import load_scenario

BASE = {
    "name": "test-digits",
    "request": {"what": "digit 3 <script>alert(1)</script>", "requested_by": "a test", "date": "2026-11-24"},
    "model": {"name": "digits-cnn"},
    "data": {"source": "digits"},
    "forget": {"kind": "class", "label": 3},
    "methods": {"salun": {"ratio": 0.5, "epochs": 1, "lr": 0.01}, "ga": {"epochs": 1, "lr": 0.001}},
    "retrain": {"epochs": 2},
    "threads": 1,
}


def write(tmp_path, scenario: dict, name: str = "scenario.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(scenario))
    return path


def variant(path: str, value) -> dict:
    scenario = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = scenario
    for key in parents:
        node = node[key]
    node[leaf] = value
    return scenario


BAD = {
    "unknown top-level key": (variant("methds", {}), "methds: Extra inputs are not permitted"),
    "unknown nested key": (variant("model.nme", "x"), "model.nme: Extra inputs are not permitted"),
    "unknown method option": (variant("methods.salun.ratoi", 0.5), "methods.salun: ratoi: Extra inputs"),
    "ratio out of range": (variant("methods.salun.ratio", 1.5), "methods.salun: ratio: Input should be less than"),
    "unknown method": (variant("methods.salun2", {}), "unknown method 'salun2'"),
    "fraction out of range": (variant("forget", {"kind": "random", "fraction": 2}), "forget.fraction"),
    "missing selector": (variant("forget", {"kind": "class"}), "needs 'label'"),
    "no methods": (variant("methods", {}), "methods: Dictionary should have at least 1 item"),
    "bad name": (variant("name", "a/b"), "name: 'a/b' cannot name an output folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_schema_rejects_bad_scenarios_naming_the_key(case, tmp_path):
    scenario, expected = BAD[case]
    with pytest.raises(SafeEditError) as error:
        load_scenario(write(tmp_path, scenario))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_not_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(SafeEditError, match="not valid YAML"):
        load_scenario(broken)
    with pytest.raises(SafeEditError, match="no such scenario file"):
        load_scenario(tmp_path / "absent.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))  # was an internal error (UnicodeDecodeError)
    with pytest.raises(SafeEditError, match="not UTF-8 text; save it as UTF-8"):
        load_scenario(latin)


def test_ready_made_scenarios_validate():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.glob("scenarios/*.yaml"))
    assert files
    for path in files:
        load_scenario(path)


def test_model_dtype_is_for_language_models_only(tmp_path):
    from pathlib import Path

    scenarios = Path(__file__).parent.parent / "scenarios"
    for name, kind in (("tofu-forget10", "llm-unlearning"), ("digits-forget-class", "classification")):
        raw = yaml.safe_load((scenarios / f"{name}.yaml").read_text())
        raw["model"]["dtype"] = "stored"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        if kind == "llm-unlearning":
            loaded = load_scenario(path)
            assert loaded.model.dtype == "stored" and loaded.model_dump()["model"]["dtype"] == "stored"
            # options added later are recorded only when set, so earlier records keep their shape
            assert "dtype" not in loaded.model.model_copy(update={"dtype": "float32"}).model_dump()
            unlearning = type(loaded.unlearning)
            assert "mixed_precision" not in unlearning().model_dump()
            assert unlearning(mixed_precision="bf16").model_dump()["mixed_precision"] == "bf16"
        else:
            with pytest.raises(SafeEditError, match=r"model\.dtype applies to language models only"):
                load_scenario(path)
    raw["model"]["dtype"] = "bf16"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SafeEditError, match="dtype"):
        load_scenario(path)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        record_path = run_scenario(write(folder, BASE), folder / "out", progress=False)
    return record_path, json.loads(record_path.read_text())


def test_record_holds_results_hashes_and_request(digits_run):
    record_path, record = digits_run
    assert record["schema"] == "safeedit.record/2"
    assert record["request"]["what"] == BASE["request"]["what"]
    assert set(record["results"]) == {"original", "retrain", "salun", "ga"}
    salun = record["results"]["salun"]
    for key in ("ua", "ra", "ta", "mia_efficacy", "mia_attack_accuracy", "mia_auc", "gap_to_retrain",
                "time_vs_retrain"):
        assert 0.0 <= salun["metrics"]["after"][key] <= max(1.0, salun["metrics"]["after"]["time_vs_retrain"])
    assert salun["metrics"]["before"] == record["results"]["original"]["metrics"]["after"]
    assert salun["mask"]["selected"] == round(0.5 * salun["mask"]["total"])
    assert record["results"]["ga"]["mask"] is None
    assert record["data"]["forget"]["count"] == 146
    assert record["data"]["forget"]["count"] + record["data"]["retain"]["count"] == 1437
    out = record_path.parent
    roles = {entry["path"]: entry["role"] for entry in record["outputs"]}
    assert roles == {"retrain.safetensors": "reference weights", "salun.safetensors": "edited weights",
                     "salun.mask.safetensors": "mask", "ga.safetensors": "edited weights"}
    for entry in record["outputs"]:
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    for entry in record["inputs"]:
        assert sha256_file(entry["path"]) == entry["sha256"]
    mask = Mask.load(out / "salun.mask.safetensors")
    assert mask.metadata["source_weights_sha256"] == record["model"]["weights_sha256"]


def test_same_scenario_same_seed_same_files(digits_run, tmp_path, monkeypatch):
    """Run again from the same scenario: every output file is byte-identical (so its hash is too)."""
    _, first = digits_run
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    again = json.loads(run_scenario(write(tmp_path, BASE), tmp_path / "again", progress=False).read_text())
    assert {e["path"]: e["sha256"] for e in again["outputs"]} == {e["path"]: e["sha256"] for e in first["outputs"]}


def test_cli_run_prints_table_and_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    scenario = variant("methods", {"ft": {"epochs": 1}})
    code = main(["run", str(write(tmp_path, scenario)), "--out", str(tmp_path / "out"), "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "record: " in stdout and "retrain" in stdout and "gap_to_retrain" in stdout
    assert stdout.strip().splitlines()[-1] == f"report: {tmp_path / 'out' / 'report.html'}"


@pytest.fixture(scope="module")
def tiny_resnet_and_images(tmp_path_factory):
    """A tiny random `ResNetForImageClassification` and a synthetic 3-class image data set saved to disk."""
    from transformers import ResNetConfig, ResNetForImageClassification

    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                          layer_type="basic")
    ResNetForImageClassification(config).save_pretrained(folder / "model")
    rng = np.random.default_rng(0)

    def images(count: int, offset: int) -> Dataset:
        labels = rng.integers(0, 3, count)
        pixels = rng.normal(0, 0.3, (count, 1, 16, 16)).astype(np.float32)
        for i, label in enumerate(labels):  # each class lights up its own band of rows
            pixels[i, 0, 5 * label : 5 * label + 5] += 1.0
        features = Features({"id": Value("int64"), "pixel_values": Array3D((1, 16, 16), "float32"),
                             "label": ClassLabel(num_classes=3)})
        return Dataset.from_dict({"id": list(range(offset, offset + count)), "pixel_values": pixels,
                                  "label": labels.tolist()}, features=features)

    DatasetDict(train=images(96, 0), test=images(48, 1000)).save_to_disk(str(folder / "data"))
    return folder


def test_salun_on_a_transformers_classifier_and_a_datasets_folder(tiny_resnet_and_images, tmp_path):
    folder = tiny_resnet_and_images
    scenario = {
        **copy.deepcopy(BASE),
        "name": "tiny-resnet",
        "model": {"name": str(folder / "model"), "recipe": {"epochs": 1, "lr": 0.01, "batch_size": 16}},
        "data": {"source": str(folder / "data")},
        "forget": {"kind": "class", "label": 1},
        "methods": {"salun": {"ratio": 0.2, "epochs": 1, "lr": 0.01, "batch_size": 16}},
        "retrain": {},
    }
    record = json.loads(run_scenario(write(tmp_path, scenario), tmp_path / "out", progress=False).read_text())
    assert set(record["results"]) == {"original", "retrain", "salun"}
    mask = Mask.load(tmp_path / "out" / "salun.mask.safetensors")
    assert any(name.startswith("resnet.") for name in mask.tensors)
    assert mask.selected == round(0.2 * mask.total)
    assert record["inputs"][1]["path"].endswith("model.safetensors")
