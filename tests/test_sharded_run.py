"""`safeedit run` of an llm-unlearning scenario under `accelerate launch` with 2 CPU processes (gloo): the model is
sharded by FSDP2 (issue 22), trained with gradient accumulation, gradient checkpointing and bf16 autocast, and the
run writes what one process writes: the same metrics, the same mask, the same weights, masked-out weights
bit-identical to the model's. Kinds and settings that cannot run sharded are refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helpers as H
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_llmfiles import FOLDER

from safeedit.cli import main
from safeedit.masks import Mask

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "scenarios" / "examples" / "llm-forget-files.yaml"
LARGE_MODEL = {"batch_size": 1, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
               "mixed_precision": "bf16"}


def scenario_file(folder: Path, **changes) -> Path:
    """The own-files example with the large-model options in `unlearning:` (and `changes`), written to `folder`."""
    scenario = yaml.safe_load(EXAMPLE.read_text())
    scenario["unlearning"].update(LARGE_MODEL)
    scenario["save_weights"] = ["npo+wagle", "graddiff"]
    scenario.update(changes)
    path = folder / "sharded.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path


def test_sharded_run_writes_what_one_process_writes(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(built)
    scenario = scenario_file(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(scenario), "--out", str(one), "--no-pdf", "-q"]) == 0, capsys.readouterr().err
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(H.free_port()),
               "-m", "safeedit", "run", str(scenario), "--out", str(two), "--no-pdf", "-q"]
    code, stdout, stderr = H.launch(command, timeout_s=240, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert code == 0, stderr[-3000:]
    assert stdout.count("verdict: PASS") == 1  # the first process alone prints
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    expected, got = (json.loads((folder / "record.json").read_text()) for folder in (one, two))
    assert got["notes"][-1].startswith("Run by 2 processes (gloo), the model sharded by FSDP2")
    assert got["results"].keys() == expected["results"].keys() == {"original", "retrain", "npo+wagle", "graddiff"}
    for name, entry in expected["results"].items():
        after = got["results"][name]["metrics"]["after"]
        assert after.keys() == entry["metrics"]["after"].keys()
        for metric, value in entry["metrics"]["after"].items():
            assert after[metric] == pytest.approx(value, abs=1e-5), (name, metric)
        if entry.get("weight_changes"):
            changes = got["results"][name]["weight_changes"]
            assert changes["changed"] == entry["weight_changes"]["changed"] > 0, name
            assert changes["changed_outside_mask"] == entry["weight_changes"]["changed_outside_mask"], name
    mask = Mask.load(two / "npo+wagle.mask.safetensors")
    assert mask.tensors.keys() == Mask.load(one / "npo+wagle.mask.safetensors").tensors.keys()
    for name, value in Mask.load(one / "npo+wagle.mask.safetensors").tensors.items():
        assert torch.equal(mask.tensors[name], value), name
    original = load_file(built / FOLDER / "model" / "model.safetensors")
    for method in ("npo+wagle", "graddiff"):
        single, sharded = (load_file(folder / method / "model.safetensors") for folder in (one, two))
        assert sharded.keys() == original.keys()
        for name, start in original.items():
            torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6)
            if method == "npo+wagle":
                keep = mask.tensors.get(name, torch.zeros_like(start, dtype=torch.bool))
                assert torch.equal(sharded[name][~keep], start[~keep]), f"masked-out entries of {name} changed"
        changed = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(sharded[changed], original[changed]), method
    config = json.loads((two / "npo+wagle" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # the model's class, not FSDP2's wrapper


@pytest.mark.parametrize("what, changes, words", [
    ("a classification scenario", None, "classification-unlearning scenarios run in one process"),
    ("the fictitious-authors setting", "tofu", "the fictitious-authors setting fine-tunes its own models first"),
    ("the robustness battery", {"robustness": {"relearn_steps": [0, 10]}}, "the robustness battery (robustness:) "
                                                                          "runs in one process"),
])
def test_what_cannot_run_sharded_is_refused_in_one_line(built, tmp_path, monkeypatch, capsys, what, changes, words):
    monkeypatch.chdir(built)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    if changes is None:
        path = tmp_path / "digits.yaml"
        path.write_text(yaml.safe_dump(H.QUICK_SCENARIO))
    elif changes == "tofu":
        path = ROOT / "scenarios" / "tofu-forget10.yaml"
    else:
        path = scenario_file(tmp_path, **changes)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-pdf", "-q"]) == 2, what
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and words in error, error
    assert not (tmp_path / "out").exists()
