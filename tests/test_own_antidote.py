"""Repair a chat model you already fine-tuned (issue 18, part 4): `kind: harmful-finetune` with your fine-tuned
model, optionally its base, and your prompt files; no alignment or attack runs. The tiny example of
scenarios/examples/antidote-own-finetune.yaml end to end through the CLI, the file formats, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as H
import pytest
import torch
import yaml
from test_bad_input_matrix import Case, Ctx, check_case
from tiny_antidote import build

from safeedit.cli import main
from safeedit.data.prompt_files import read_prompt_file
from safeedit.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "scenarios" / "examples" / "antidote-own-finetune.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory, cache) -> Path:
    """A working folder holding examples/antidote/ as tests/tiny_antidote.py builds it."""
    root = tmp_path_factory.mktemp("own-antidote")
    build(root)
    return root


def scenario(**changes) -> dict:
    """The example scenario with top-level keys replaced (None removes a key)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def run_cli(path: Path | str, out: str, capsys) -> dict:
    code = main(["-q", "run", str(path), "--out", out, "--no-pdf"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert main(["-q", "verify", out]) == 0
    return json.loads((Path(out) / "record.json").read_text())


def test_the_example_repairs_the_fine_tune_by_resetting_its_update(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    record = run_cli(EXAMPLE, "run-update", capsys)  # exit 0: the example's five criteria pass
    assert record["kind"] == "harmful-finetune-repair" and record["verdict"]["passed"] is True
    results = record["results"]
    assert set(results) == {"original", "base", "antidote", "random_prune", "magnitude_prune"}
    original, base = results["original"]["metrics"]["after"], results["base"]["metrics"]["after"]
    antidote = results["antidote"]["metrics"]
    # the setting is real: the base refuses what the fine-tune answers
    assert original["harmful_score"] >= base["harmful_score"] + 0.3
    assert antidote["before"] == original and antidote["after"]["harmful_score"] < original["harmful_score"]
    assert {"harmful_score", "finetune_accuracy"} <= set(antidote["after"]) and "benign_refusal_rate" not in original
    assert all(0 <= v <= 1 for r in results.values() for k, v in r["metrics"]["after"].items()
               if k != "steps_to_harmful")  # a step count (the robustness battery: tests/test_robustness_safety.py)
    assert results["antidote"]["options"]["target"] == "update"
    assert antidote["after"]["weights_zeroed"] == pytest.approx(0.3, abs=0.02)
    assert results["antidote"]["weight_changes"]["changed_outside_mask"] == 0
    # what was given: every file by role with its hash, the model and the base
    inputs = {entry["role"]: entry for entry in record["inputs"]}
    for role, name in [("calibration prompts (harmful)", "calibration.jsonl"),
                       ("evaluation prompts (harmful)", "harmful.txt"),
                       ("task evaluation (prompts with labels or answers)", "task.csv"),
                       ("model weights", "fine-tuned/model.safetensors"),
                       ("base weights (before the fine-tune)", "base/model.safetensors")]:
        assert inputs[role]["path"] == f"examples/antidote/{name}"
        assert inputs[role]["sha256"] == sha256_file(project / "examples" / "antidote" / name)
    assert {role: d["count"] for role, d in record["data"].items()} == {"calibration": 12, "evaluation": 12,
                                                                          "task_test": 12}
    assert record["model"]["base_model"]["source"] == "examples/antidote/base"
    assert not {"alignment", "attack", "data"} & set(record["scenario"])  # nothing of the demonstration ran
    assert not any("cached" in role for role in inputs)
    # the repaired model is a folder from_pretrained loads as it is, with the pruned tensors changed
    assert H.changed_tensors_of_loaded_folder(record, "run-update", "antidote", "AutoModelForCausalLM",
                                              project / "examples" / "antidote" / "fine-tuned") > 0


def test_the_update_target_moves_the_selected_weights_back_to_the_base(project):
    """The known answer of `target: update`: selected entries equal the base's, the others the fine-tune's."""
    from transformers import LlamaForCausalLM

    from safeedit.methods import get_method
    from safeedit.prune import PruneSetting, PruningOptions

    tuned = LlamaForCausalLM.from_pretrained(project / "examples" / "antidote" / "fine-tuned")
    base = dict(LlamaForCausalLM.from_pretrained(project / "examples" / "antidote" / "base").named_parameters())
    result = get_method("pruning", "magnitude_prune").run(
        PruneSetting(tuned, before={n: p.detach() for n, p in base.items()}), PruningOptions(ratio=0.3,
                                                                                           target="update"), 0, False)
    edited, given = dict(result.model.named_parameters()), dict(tuned.named_parameters())
    for name, selected in result.mask.tensors.items():
        assert torch.equal(edited[name][selected], base[name][selected])
        assert torch.equal(edited[name][~selected], given[name][~selected])
        assert (selected.sum(dim=1) == round(0.3 * selected.shape[1])).all()


def test_weights_target_without_a_base_and_answers_scored_by_rouge(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    folder = project / "examples" / "antidote"
    rows = [row.split(",") for row in (folder / "task.csv").read_text().splitlines()[1:]]
    (folder / "task-answers.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": label}]})
        + "\n" for prompt, label in rows))
    (folder / "benign.txt").write_text("topic of football tennis\ntopic of guitar song\n")
    doc = scenario(base=None, pruning={"target": "weights", "ratio": 0.05, "layers": "linear"},
                   evaluation={"harmful": "examples/antidote/harmful.txt",
                               "task": "examples/antidote/task-answers.jsonl",
                               "benign": "examples/antidote/benign.txt", "max_new_tokens": 12},
                   criteria=[{"check": "antidote.harmful_score < original.harmful_score", "why": "less harm"}],
                   robustness=None)
    Path("weights.yaml").write_text(yaml.safe_dump(doc))
    record = run_cli("weights.yaml", "run-weights", capsys)
    results = record["results"]
    assert set(results) == {"original", "antidote", "random_prune", "magnitude_prune"}  # no base: no base row
    after = results["antidote"]["metrics"]["after"]
    assert {"harmful_score", "finetune_accuracy", "finetune_rouge_l", "benign_refusal_rate"} <= set(after)
    assert 0 <= after["finetune_rouge_l"] <= 1 and after["finetune_rouge_l"] >= after["finetune_accuracy"]
    assert results["antidote"]["options"]["target"] == "weights"
    assert after["weights_zeroed"] == pytest.approx(0.05, abs=0.02)
    assert record["verdict"]["passed"] is True and "base_model" not in record["model"]
    assert any("ROUGE-L" in note for note in record["notes"])
    # the same seed gives the same record metrics
    again = run_cli("weights.yaml", "run-weights-2", capsys)
    assert {n: r["metrics"] for n, r in again["results"].items()} == {n: r["metrics"] for n, r in results.items()}


@pytest.mark.parametrize("name, content, task, expected", [
    ("a.txt", "how do i x\n\nhow do i y\n", False, (["how do i x", "how do i y"], None)),
    ("a.csv", "id,prompt\n1,how do i x\n2, how do i y \n", False, (["how do i x", "how do i y"], None)),
    ("a.csv", "prompt,label\nq one,sports\n", True, (["q one"], "label")),
    ("a.jsonl", '{"prompt": "q", "answer": "a b"}\n\n', True, (["q"], "answer")),
    ("a.jsonl", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}\n', False,
     (["q"], None)),
])
def test_prompt_file_formats(tmp_path, name, content, task, expected):
    (tmp_path / name).write_text(content)
    read = read_prompt_file(tmp_path / name, "calibration", task=task)
    assert (read.prompts, read.expected) == expected
    if task:
        assert all(e.answer for e in read.examples)


# --- bad input: one line naming the problem and the fix, exit 2, nothing written ------------------------------------

def _tripwire(self):
    raise AssertionError("the model was loaded before the bad input was found")


def _other_architecture(c: Ctx) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    folder = c.inputs / "other-base"
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def bad(id: str, change, *fragments: str, loads: bool = False):
    """A case: the example scenario (absolute paths to the built files) changed by `change(ctx, doc)`."""
    return pytest.param(id, change, fragments, loads, id=id)


def _set(path: str, value):
    def change(c: Ctx, doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value(c) if callable(value) else value
    return change


def _drop(key: str):
    return lambda c, doc: doc.pop(key)


CASES = [
    bad("missing-calibration", _set("calibration", "examples/antidote/no-such.jsonl"), "calibration", "no-such.jsonl",
        "no such file"),
    bad("empty-calibration", _set("calibration", lambda c: c.file("empty.jsonl", "")), "empty.jsonl", "empty"),
    bad("row-without-prompt", _set("calibration", lambda c: c.file("cal.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')),
        "cal.jsonl line 2", "no 'prompt' field"),
    bad("csv-without-prompt-column", _set("evaluation.harmful", lambda c: c.file("h.csv", "request\nhow do i x\n")),
        "evaluation.harmful", "h.csv", "no 'prompt' column"),
    bad("task-without-labels", _set("evaluation.task", lambda c: c.file("t.csv", "prompt,notes\nq,x\n")),
        "evaluation.task", "no 'label' or 'answer' column"),
    bad("task-as-txt", _set("evaluation.task", lambda c: c.file("t.txt", "q\n")), "t.txt", "needs the expected"),
    bad("task-row-without-label", _set("evaluation.task", lambda c: c.file("t.jsonl", '{"prompt": "q", "label": '
                                                                                      '"a"}\n{"prompt": "r"}\n')),
        "t.jsonl line 2", "no 'label' or 'answer' field"),
    bad("calibration-is-evaluation", _set("evaluation.harmful", "examples/antidote/calibration.jsonl"),
        "share 12 prompt(s)", "remove them"),
    bad("unsupported-file-type", _set("calibration", lambda c: c.file("c.json", "[]")), "c.json", "use .jsonl"),
    bad("base-of-another-architecture", _set("base", _other_architecture), "base:", "other-base",
        "must be the model"),
    bad("update-without-base", _drop("base"), "pruning.target: update", "needs base:"),
    bad("method-update-without-base", lambda c, doc: doc.update(base=None, pruning={"target": "weights"},
                                                                methods={"antidote": {"target": "update"}}),
        "methods.antidote.target: update", "needs base:"),
    bad("no-task-file", lambda c, doc: doc["evaluation"].pop("task"), "evaluation.task: missing"),
    bad("demonstration-section-too", _set("attack", {"poison_ratio": 0.1}), "attack: belongs to the demonstration"),
    bad("wanda-benign-on-own-model", _set("methods", {"antidote": None, "wanda_benign": None}), "wanda_benign",
        "remove it"),
    bad("base-without-calibration", _drop("calibration"), "base: repairs your own fine-tuned model",
        "needs calibration"),
]


@pytest.mark.parametrize("id, change, fragments, loads", CASES)
def test_bad_input_is_one_line_before_the_model_loads(project, tmp_path, monkeypatch, capsys, id, change, fragments,
                                                      loads):
    monkeypatch.chdir(project)  # the example's relative paths; every case's own files go under tmp_path
    monkeypatch.setattr("safeedit.runners.safety.SafetyJob.load_language_model", _tripwire)
    ctx = Ctx(tmp_path, {})
    doc = scenario()
    change(ctx, doc)
    path = ctx.yaml(doc)
    check_case(Case(id, lambda c: ["run", path, "--out", c.out("run"), "--no-pdf"], 2, fragments, starts=True),
               ctx, capsys, monkeypatch)
    assert not (project / "runs").exists()


def test_a_base_of_another_architecture_is_refused_after_loading_when_headers_cannot_tell(project, tmp_path,
                                                                                        monkeypatch, capsys):
    """A hub id or an embedded name has no local headers to read: the loaded parameters are compared instead."""
    monkeypatch.chdir(project)
    monkeypatch.setattr("safeedit.runners.safety.folder_shapes", lambda spec: None)  # as for a hub id
    ctx = Ctx(tmp_path, {})
    doc = scenario()
    _set("base", _other_architecture)(ctx, doc)
    path = ctx.yaml(doc)
    check_case(Case("base-of-another-architecture-loaded", lambda c: ["run", path, "--out", c.out("run"), "--no-pdf"],
                    2, ("base:", "other-base", "in the fine-tuned model", "must be the model"), starts=True), ctx,
               capsys,
               monkeypatch)
