"""The LLM unlearning attack surface (issue 20): who holds which rows, the fact a generated answer names, the
probes, and the battery through a scenario on the user's own files (tiny Llama of tests/tiny_llmfiles.py)."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as H
import pytest
import yaml
from test_llm_scenario import AUTHORS, scenario_text, tiny_folder  # noqa: F401 (tiny_folder: a fixture)
from test_own_llm_files import SCENARIO
from tiny_llmfiles import FOLDER

from safeedit.cli import main
from safeedit.data.authors import FACTS, QAItem, author_questions, generate_authors, question_variants
from safeedit.data.capitals import answer_mentions, capital_question_variants
from safeedit.data.qa_files import read_qa_files
from safeedit.errors import SafeEditError
from safeedit.robustness import RobustnessOptions, attack, relearn_curve
from safeedit.robustness.language import (
    NO_TEMPLATES,
    LanguageData,
    LanguageSurface,
    attacker_split,
    distinguishing_value,
    language_surface,
)
from safeedit.robustness.language_names import PROBES, language_metric_names, measured_metric_names
from safeedit.runners import run_scenario
from safeedit.scenario import load_scenario


@pytest.fixture(scope="module")
def files(built):
    from safeedit.models.language import load_language_model

    folder = built / FOLDER
    qa = read_qa_files(folder / "forget.jsonl", folder / "retain.jsonl", None, folder / "perturbed.jsonl")
    model = load_language_model(str(folder / "model"), progress=False)
    reference = load_language_model(str(folder / "reference"), progress=False).model
    return qa, model.model, model.tokenizer, reference


def qa(n: int, prefix: str) -> list[QAItem]:
    return [QAItem("", f"{prefix} question {i}", f"{prefix} answer {i}", f"{prefix} answer {i}", ()) for i in range(n)]


# --- data: who holds what, and the fact an answer names ------------------------------------------------------------


def test_the_attacker_rows_are_never_measured_and_related_rows_leave_the_measured_retain():
    forget, retain = qa(10, "forget"), qa(30, "retain")
    evaluated = retain[::3]  # 10 of 30, as retain_subset picks (the same objects)
    data = LanguageData.files(forget, retain, evaluated)
    split = attacker_split(data, 0.3, seed=0)
    assert len(split.held) == 3 and sorted(split.held + split.measured) == list(range(10))
    assert not set(split.held) & set(split.measured)
    assert split == attacker_split(data, 0.3, seed=0) and split.held != attacker_split(data, 0.3, seed=5).held
    # related rows come from the 20 retain rows the metrics do not read, so the measured retain rows stay whole
    assert len(split.related) == 3 and not {id(q) for q in split.related} & {id(q) for q in evaluated}
    assert split.measured_retain == evaluated
    # when every retain row is evaluated, the related ones leave the measured ones
    tight = attacker_split(LanguageData.files(forget, retain[:5], retain[:5]), 0.3, seed=0)
    assert len(tight.measured_retain) == 2
    assert not {id(q) for q in tight.related} & {id(q) for q in tight.measured_retain}
    # holding every forget row: they are all measured too, as the surface's about says
    whole = attacker_split(data, 1.0, seed=0)
    assert whole.held == whole.measured == list(range(10))
    with pytest.raises(SafeEditError, match="related set takes all"):
        attacker_split(LanguageData.files(forget, retain[:2], retain[:2]), 1.0, seed=0)
    alone = attacker_split(LanguageData.files(forget, retain[:2], retain[:2]), 1.0, seed=0, related=False)
    assert alone.related == [] and alone.measured_retain == retain[:2]


def test_the_fact_of_a_generated_answer_is_where_the_wrong_answers_differ():
    for author in generate_authors(8, seed=3):
        for fact, item in zip(FACTS, author_questions(author, len(FACTS), 3, seed=3), strict=True):
            value, truth = distinguishing_value(item), fact.value(author)
            assert value and answer_mentions(truth, value), (fact.key, value, truth)  # whole words of the fact
            if fact.key in ("birth_place", "birth_year", "debut_year", "genre", "theme", "hobby", "studied"):
                assert value == truth, (fact.key, value, truth)
            assert value not in " ".join(item.perturbed) or fact.key in ("debut", "acclaimed")
    years = QAItem("", "q", "a", "The year is 1975.", ("The year is 1971.", "The year is 1983."))
    assert distinguishing_value(years) == "1975"  # "197" is shared, but a word is never split
    with pytest.raises(SafeEditError, match="do not differ"):
        distinguishing_value(QAItem("", "q", "a", "same", ("same",)))


def test_question_variants_ask_the_same_fact_of_the_same_person():
    author = generate_authors(1, seed=0)[0]
    for item in author_questions(author, len(FACTS), 1, seed=0):
        variants = question_variants(item.question)
        assert set(variants) == {"reworded", "french"}
        assert all(author.name in text and text != item.question for text in variants.values())
    assert question_variants("What is the capital of France?") == {}
    assert capital_question_variants("France") == {"reworded": "Name the capital city of France.",
                                                   "french": "Quelle est la capitale de France ?"}


# --- the surface on a tiny model -----------------------------------------------------------------------------------


def test_relearning_the_held_forget_rows_brings_the_others_back_on_the_reference(files):
    qa_files, model, tokenizer, reference = files
    data = LanguageData.files(qa_files.forget.items, qa_files.retain.items, qa_files.retain.items)
    options = RobustnessOptions(relearn_steps=[0, 3, 8], forget_share=0.25, lr=1e-2)
    surface = language_surface(data, tokenizer, options, seed=0, max_new_tokens=8, reference=reference)
    assert set(surface.measure(model)) == set(measured_metric_names("files", True, True))
    curve = relearn_curve(reference, surface.relearn["forget"], surface.loss, surface.measure, [0, 3, 8], 1e-2, 0)
    probability = curve["metrics"]["probability_forget"]
    assert curve["steps"] == [0, 3, 8] and all(len(v) == 3 for v in curve["metrics"].values())
    # the reference never saw the forget person; one held pair about them raises the other pairs' probability
    assert probability[0] < 0.01 and probability[2] > 3 * probability[0]
    # the reference measured against its own truth ratios on the same rows: identical before any step
    assert curve["metrics"]["forget_quality"][0] == 1.0
    assert surface.relearn["forget"].examples == 1 and surface.relearn["related"].examples == 1


def test_the_battery_adds_exactly_the_names_the_scenario_check_accepts(files):
    qa_files, model, tokenizer, reference = files
    data = LanguageData.files(qa_files.forget.items, qa_files.retain.items, qa_files.retain.items[:6])
    options = RobustnessOptions(relearn_steps=[0, 2], forget_share=0.25, lr=1e-3)
    surface = language_surface(data, tokenizer, options, seed=0, max_new_tokens=8, reference=reference)
    inner, calls = surface.measure.__self__, []
    measured = inner.measured
    inner.measured = lambda m: calls.append(1) or measured(m)
    flat, entry = attack(surface, "original", model, reference, options, seed=0, progress=False)
    # steps 0 and 2 of two relearning sets, int8 and int4: the second curve's start is the model measured first
    assert len(calls) == 5
    assert set(flat) == language_metric_names("files", True, True, options)
    probes = entry["attacks"]["probes"]
    assert set(probes["probes"]) == {"plain", "mc", "fewshot"}
    assert set(probes["skipped"]) == {"reworded", "french", "fill_in"} and NO_TEMPLATES in probes["about"]
    # the original model knows the forget answers, in any of the formats
    assert flat["probability_forget_plain"] > 0.9 and flat["forget_accuracy_mc"] == 1.0
    assert json.loads(json.dumps(entry)) == entry  # plain JSON for the record


def test_every_probe_runs_on_fictitious_authors(tmp_path):
    people = generate_authors(3, seed=0)
    items = [q for a in people for q in author_questions(a, 4, 3, seed=0)]
    forget, retain = items[:4], items[4:]
    texts = [t for q in items for t in (q.question, q.answer, q.paraphrased, *q.perturbed,
                                        *question_variants(q.question).values())]
    tokenizer = H.word_chat_tokenizer(sorted({w for t in texts for w in t.split()}))
    model = H.make_llama()
    model.resize_token_embeddings(len(tokenizer))
    data = LanguageData.authors(forget, retain, retain[:4])
    split = attacker_split(data, 0.25, seed=0)
    surface = LanguageSurface(data, tokenizer, split, 0, 4, 16, None)
    asked = surface.asked()
    assert list(asked) == list(PROBES)
    measured = [forget[i] for i in split.measured]
    for prompt, item, value in zip(asked["fill_in"].prompts, measured, asked["fill_in"].values, strict=True):
        assert "____" in prompt and value not in prompt and value in item.paraphrased
    for prompt, options in zip(asked["mc"].prompts, asked["mc"].options, strict=True):
        assert all(option in prompt for option in options)
    held = forget[split.held[0]]
    assert all(held.question in p and held.answer in p for p in asked["fewshot"].prompts)
    assert not any(q.answer in p for q in measured for p in asked["fewshot"].prompts)
    outcome = surface.probes(model)
    assert set(outcome["metrics"]) == {f"forget_accuracy_{p}" for p in PROBES} and not outcome["skipped"]
    assert all(0 <= v <= 1 for v in outcome["metrics"].values())
    assert outcome == surface.probes(model)  # deterministic


# --- through a scenario --------------------------------------------------------------------------------------------


def scenario(built: Path, tmp_path: Path, **changes) -> Path:
    doc = yaml.safe_load(SCENARIO.read_text())
    folder = built / FOLDER
    doc["model"]["name"] = str(folder / "model")
    doc["reference"]["model"] = str(folder / "reference")
    doc["data"] = {key: str(built / value) for key, value in doc["data"].items()}
    doc["methods"] = {"graddiff": {"lr": 5.0e-3, "epochs": 1}}
    doc["robustness"] = {"relearn_steps": [0, 2], "forget_share": 0.25, "lr": 1.0e-2, "quantize": ["int4"]}
    doc["criteria"] = [
        {"check": "graddiff.relearn_probability_forget@2 >= graddiff.probability_forget_int4 - 100%"},
        {"check": "graddiff.forget_accuracy_mc <= original.forget_accuracy_mc"},
        {"check": "graddiff.relearn_related_probability_retain@2 >= 0"},
    ]
    doc.update(changes)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_scenario_attacks_every_result_and_judges_robustness_criteria(built, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(scenario(built, tmp_path)), "--out", str(out), "--no-pdf", "-q"]) == 0, \
        capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    for name in ("original", "retrain", "graddiff"):
        entry = record["results"][name]["robustness"]
        assert set(entry["relearning"]) == {"forget", "related"} and set(entry["quantization"]) == {"int4"}
        assert entry["relearning"]["forget"]["steps"] == [0, 2]
        assert entry["budget"]["primary"] == "probability_forget" and entry["budget"]["lr"] == 1e-2
        assert "relearn_truth_ratio_forget@2" in record["results"][name]["metrics"]["after"]
    assert all(row["measured"] is not None and row["threshold"] is not None for row in record["verdict"]["criteria"])
    assert record["timings"]["robustness_s"] > 0


def test_probe_criteria_need_the_section_and_a_probe_the_protocol_has(built, tmp_path):
    without = scenario(built, tmp_path, robustness=None,
                       criteria=[{"check": "graddiff.forget_accuracy_mc <= 100%"}])
    with pytest.raises(SafeEditError, match="needs forget_accuracy_mc, which only the robustness battery measures"):
        load_scenario(without)
    fill_in = scenario(built, tmp_path, criteria=[{"check": "graddiff.forget_accuracy_fill_in <= 100%"}])
    with pytest.raises(SafeEditError, match="needs forget_accuracy_fill_in"):
        load_scenario(fill_in)
    assert load_scenario(scenario(built, tmp_path)).robustness.relearn_steps == [0, 2]


def test_fictitious_authors_attack_the_kept_reference_and_run_every_probe(tiny_folder, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario_text(tiny_folder, json.dumps({"protocol": "fictitious-authors", **AUTHORS}),
                                  "{npo+wagle: null}",
                                  "robustness: {relearn_steps: [0, 1], quantize: [int8]}\n"
                                  'criteria: ["npo+wagle.forget_accuracy_fewshot <= retrain.forget_accuracy_fewshot'
                                  ' + 100%"]'))
    record = json.loads(run_scenario(path, tmp_path / "out", progress=False).read_text())
    results = record["results"]
    assert {name for name, r in results.items() if "robustness" in r} == {"original", "retrain", "npo+wagle"}
    after = {name: r["metrics"]["after"] for name, r in results.items()}
    # forget quality against the reference's own truth ratios on the same rows: the untouched reference is 1.0
    assert after["retrain"]["relearn_forget_quality@0"] == 1.0
    for name in after:
        assert {f"forget_accuracy_{probe}" for probe in PROBES} <= set(after[name]), name
        # int8 barely moves a model: the measure after rounding is close to the unrounded one
        assert abs(after[name]["relearn_probability_forget@0"] - after[name]["probability_forget_int8"]) < 0.05
    budget = results["npo+wagle"]["robustness"]["budget"]
    assert budget["primary"] == "probability_forget" and "holds 1 of 2 forget pairs" in budget["about"]
    assert not results["npo+wagle"]["robustness"]["attacks"]["probes"]["skipped"]
    assert record["verdict"]["criteria"][0]["measured"] is not None
