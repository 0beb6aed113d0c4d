"""The `llm-unlearning` scenario kind end to end, on a tiny random Llama saved with a word-level chat tokenizer."""

from __future__ import annotations

import json

import helpers as H
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safeedit.data.authors import fictitious_authors
from safeedit.errors import SafeEditError
from safeedit.masks import Mask
from safeedit.report import write_report
from safeedit.runners import run_scenario
from safeedit.scenario import load_scenario

AUTHORS = {"authors": 10, "questions_per_author": 2, "holdout_authors": 1, "forget_ratio": 0.1, "seed": 0}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A causal LM whose tokenizer knows every word of the fictitious-author questions and answers."""
    data = fictitious_authors(AUTHORS["authors"], AUTHORS["questions_per_author"], AUTHORS["holdout_authors"], 0.1)
    texts = [t for q in [*data.train(), *data.holdout] for t in (q.question, q.answer, q.paraphrased, *q.perturbed)]
    tokenizer = H.word_chat_tokenizer(sorted({w for t in texts for w in t.split()}))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=3,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def scenario_text(folder, data: str, methods: str, extra: str = "") -> str:
    return f"""
name: tiny-llm
kind: llm-unlearning
request: {{what: "one fictitious author"}}
model: {{name: "{folder}"}}
data: {data}
finetune: {{lora_rank: 0, epochs: 1, lr: 1.0e-3, batch_size: 4}}
unlearning: {{epochs: 1, lr: 1.0e-3, batch_size: 2, ratio: 0.1}}
evaluation: {{max_new_tokens: 4, retain_questions: 4}}
methods: {methods}
{extra}
"""


def test_authors_scenario_writes_the_record_masks_and_report(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario_text(tiny_folder, json.dumps({"protocol": "fictitious-authors", **AUTHORS}),
                                  "{npo+wagle: null, graddiff: {lr: 1.0e-4}}",
                                  'criteria: ["npo+wagle.model_utility >= original.model_utility * 0.5"]'))
    record_path = run_scenario(path, tmp_path / "out", progress=False)
    record = json.loads(record_path.read_text())
    results = record["results"]
    assert set(results) == {"original", "retrain", "npo+wagle", "graddiff"}
    assert "forget_quality" not in results["retrain"]["metrics"]["after"]  # the reference is not compared with itself
    for name in ("original", "npo+wagle", "graddiff"):
        after = results[name]["metrics"]["after"]
        assert 0 <= after["forget_quality"] <= 1 and 0 <= after["mia_auc"] <= 1
        assert 0 <= after["model_utility"] <= 1 and 0 < after["truth_ratio_forget"] <= 1
    assert results["graddiff"]["options"]["lr"] == 1e-4 and results["npo+wagle"]["options"]["lr"] == 1e-3
    assert results["npo+wagle"]["mask"]["density"] == pytest.approx(0.1, abs=1e-3)
    assert results["npo+wagle"]["weight_changes"]["changed_outside_mask"] == 0
    assert results["graddiff"]["mask"] is None
    assert record["data"]["forget"]["count"] == 2 and record["data"]["holdout"]["count"] == 2
    roles = {entry["role"] for entry in record["outputs"]}
    assert {"mask", "edited model folder"} <= roles
    mask = Mask.load(tmp_path / "out" / "npo+wagle.mask.safetensors")
    assert mask.metadata["score"] == "wagle"
    assert not (tmp_path / "out" / "graddiff").exists()  # only the first method's weights by default
    assert record["verdict"]["criteria"][0]["measured"] == results["npo+wagle"]["metrics"]["after"]["model_utility"]
    files = write_report(tmp_path / "out", pdf=False)
    assert "Removal of facts from a language model" in files.html.read_text()

    # Cached fine-tunes and seeds: a second run reproduces the same numbers.
    again = json.loads(run_scenario(path, tmp_path / "again", progress=False).read_text())["results"]
    assert again["npo+wagle"]["metrics"]["after"] == results["npo+wagle"]["metrics"]["after"]


def test_capitals_scenario_names_the_fix_when_the_model_knows_too_few(tiny_folder, tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario_text(tiny_folder, "{protocol: capitals, forget: 5}", "{npo+wagle: null}"))
    with pytest.raises(SafeEditError, match=r"capital question.*lower data\.forget"):
        run_scenario(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("methods", "extra", "message"), [
    ("{dpo+wagle: null}", "", "unknown method 'dpo'; choose from graddiff, npo, refusal"),
    ("{npo+fisher: null}", "", "unknown mask score 'fisher'; one of wagle, saliency"),
    ("{npo: {learning_rate: 1}}", "", "methods.npo"),
    ("{npo: null}", "save_weights: [graddiff]", "save_weights names 'graddiff'"),
    ("{npo: null}", 'criteria: ["retrain.model_utility >= 0.5"]', ""),
])
def test_scenario_errors_are_one_line_and_name_the_fix(tiny_folder, tmp_path, methods, extra, message):
    path = tmp_path / "scenario.yaml"
    data = "{protocol: capitals}" if "retrain" in extra else json.dumps({"protocol": "fictitious-authors", **AUTHORS})
    path.write_text(scenario_text(tiny_folder, data, methods, extra))
    with pytest.raises(SafeEditError, match=message or "names 'retrain', which this scenario does not produce"):
        load_scenario(path)
