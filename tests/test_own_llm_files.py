"""LLM unlearning on a user's own files (issue 18, part 3): a fine-tuned tiny Llama, forget/retain/holdout question
files and wrong answers, the user's reference model; the scenario end to end through the CLI, the metrics that need
no generated protocol, `safeedit mask` on the same files, and bad files refused in one line naming file and line."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import helpers as H
import numpy as np
import pytest
import torch
import yaml
from test_bad_input_matrix import Case, Ctx, check_case
from tiny_llmfiles import FOLDER

from safeedit.cli import main
from safeedit.data.qa_files import read_qa_files, read_rows, spec_chat_examples
from safeedit.errors import SafeEditError
from safeedit.eval.language import answer_perplexity, qa_metric_names
from safeedit.eval.qa import QASets, metric_note, qa_metrics, utility_parts
from safeedit.masks import Mask
from safeedit.scenario import load_scenario

SCENARIO = Path(__file__).parents[1] / "scenarios" / "examples" / "llm-forget-files.yaml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the example scenario, end to end ------------------------------------------------------------------------------


def test_the_example_runs_end_to_end_and_verifies(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(built)
    before = {p: sha256(p) for p in (built / FOLDER).rglob("*") if p.is_file()}
    out = tmp_path / "run"
    assert main(["run", str(SCENARIO), "--out", str(out), "--no-pdf", "-q"]) == 0, capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    results = record["results"]
    assert set(results) == {"original", "retrain", "npo+wagle", "graddiff"}
    everything = qa_metric_names(True, True, holdout=True, reference=True, retain_perplexity=True)
    for name in ("original", "npo+wagle", "graddiff"):
        assert set(results[name]["metrics"]["after"]) == everything, name
    assert set(results["retrain"]["metrics"]["after"]) == everything - {"forget_quality"}  # not against itself
    for name, result in results.items():
        for metric, value in result["metrics"]["after"].items():
            assert (value >= 1) if metric == "perplexity" else (0 <= value <= 1), (name, metric, value)
    after = {name: result["metrics"]["after"] for name, result in results.items()}
    # The model was fine-tuned on the forget answers and the reference was not: the measurements must show it.
    assert after["original"]["probability_forget"] > 0.9 > 0.1 > after["retrain"]["probability_forget"]
    assert after["original"]["mia_auc"] == 1.0 > after["retrain"]["mia_auc"]  # memorised vs never seen
    for method in ("npo+wagle", "graddiff"):  # both unlearned something
        assert after[method]["probability_forget"] < 0.5 * after["original"]["probability_forget"], method
    assert results["npo+wagle"]["mask"]["density"] == pytest.approx(0.2, abs=1e-3)
    assert results["npo+wagle"]["weight_changes"]["changed_outside_mask"] == 0
    assert results["retrain"]["about"]["summary"].startswith("your reference model")
    assert record["verdict"]["passed"] is True
    assert {k: v["count"] for k, v in record["data"].items()} == {"forget": 4, "retain": 12, "holdout": 8}
    roles = {entry["role"]: entry for entry in record["inputs"]}
    for role, name in (("forget questions (data.forget)", "forget.jsonl"),
                       ("perturbed answers (data.perturbed)", "perturbed.jsonl"),
                       ("reference model (reference.model)", "reference/model.safetensors")):
        assert roles[role]["sha256"] == sha256(built / FOLDER / name)
    assert any("probability_retain, truth_ratio_retain, rouge_l_retain" in note for note in record["notes"])
    assert main(["verify", str(out)]) == 0
    # the edited model is a folder from_pretrained loads as it is, with the weights the method changed
    assert H.changed_tensors_of_loaded_folder(record, out, "npo+wagle", "AutoModelForCausalLM",
                                              built / FOLDER / "model") > 0
    assert main(["report", str(out), "--no-pdf", "-q"]) == 0
    page = (out / "report.html").read_text()
    assert "Answer probability, forget" in page and "examples/llmfiles/forget.jsonl" in page
    assert before == {p: sha256(p) for p in (built / FOLDER).rglob("*") if p.is_file()}  # the user's files untouched
    assert main(["run", str(SCENARIO), "--out", str(tmp_path / "again"), "--no-pdf", "-q"]) == 0
    again = json.loads((tmp_path / "again" / "record.json").read_text())["results"]
    assert {name: r["metrics"] for name, r in again.items()} == {name: r["metrics"] for name, r in results.items()}


def test_metrics_without_holdout_perturbed_or_reference(built):
    """Only forget and retain files: no membership attack, no truth ratio, model utility of the two parts left."""
    from safeedit.models.language import load_language_model

    files = read_qa_files(*(built / FOLDER / f"{name}.jsonl" for name in ("forget", "retain")))
    assert not files.forget.has_perturbed() and files.forget.items[0].paraphrased == files.forget.items[0].answer
    loaded = load_language_model(str(built / FOLDER / "model"), progress=False)
    result = qa_metrics(loaded.model, loaded.tokenizer, QASets(files.forget.items, files.retain.items,
                                                               retain_perplexity=True), None, max_new_tokens=4)
    metrics = result.metrics
    assert set(metrics) == qa_metric_names(False, False, holdout=False, reference=False, retain_perplexity=True)
    parts = utility_parts(False)
    assert parts == ("probability_retain", "rouge_l_retain")
    assert result.definitions["model_utility_parts"] == list(parts)
    p, r = metrics["probability_retain"], metrics["rouge_l_retain"]
    assert metrics["model_utility"] == pytest.approx(2 * p * r / (p + r))  # harmonic mean of two values
    assert result.forget_ratios is None
    note = metric_note(0.4, parts)
    assert "2 of TOFU's 9 values" in note and "no perturbed answers" in note


def test_answer_perplexity_is_exp_of_the_mean_token_nll():
    """Known answer: tokens with log-probs -1, -2 and -3 over two answers: exp((1 + 2 + 3) / 3) = e²."""
    assert answer_perplexity([torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])]) == pytest.approx(math.e ** 2)
    with pytest.raises(SafeEditError, match="at least one scored token"):
        answer_perplexity([torch.tensor([])])


# --- reading the files -----------------------------------------------------------------------------------------


def write(folder: Path, name: str, rows) -> Path:
    path = folder / name
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


QA = [{"question": "q one", "answer": "a one"}, {"question": "q two", "answer": "a two"}]
CHAT = {"messages": [{"role": "user", "content": "q three"}, {"role": "assistant", "content": "a three"}]}


def test_rows_of_every_form_are_read_alike(tmp_path):
    forget = write(tmp_path, "f.jsonl", [{**QA[0], "paraphrased": "one a", "perturbed": ["x", "y"]},
                                         {**QA[1], "perturbed": ["z"], "id": 7}])
    retain = write(tmp_path, "r.jsonl", [CHAT, "", {"question": "q four", "answer": "a four"}])  # a blank line
    files = read_qa_files(forget, retain)
    first, second = files.forget.items
    assert (first.question, first.answer, first.paraphrased, first.perturbed) == ("q one", "a one", "one a",
                                                                                  ("x", "y"))
    assert second.paraphrased == "a two" and files.forget.has_perturbed() and not files.retain.has_perturbed()
    assert [(q.question, q.answer) for q in files.retain.items] == [("q three", "a three"), ("q four", "a four")]
    assert files.retain.where == [f"{retain}: line 1", f"{retain}: line 3"]
    assert files.inputs()["retain questions (data.retain)"] == {str(retain): sha256(retain)}
    as_json = tmp_path / "f.json"
    as_json.write_text(json.dumps(QA))
    as_csv = tmp_path / "f.csv"
    as_csv.write_text('question,answer\nq one,a one\n"q two","a two"\n')
    for path in (as_json, as_csv):
        assert [(q.question, q.answer) for q in read_qa_files(path, retain).forget.items] == \
            [("q one", "a one"), ("q two", "a two")]


def test_wrong_answers_from_a_separate_file_keyed_by_question(tmp_path):
    forget = write(tmp_path, "f.jsonl", QA)
    retain = write(tmp_path, "r.jsonl", [CHAT])
    perturbed = write(tmp_path, "p.jsonl", [{"question": "q two", "perturbed": ["b"], "paraphrased": "two a"},
                                            {"question": "q one", "perturbed": ["c", "d"]},
                                            {"question": "q three", "perturbed": ["e"]}])
    files = read_qa_files(forget, retain, perturbed=perturbed)
    assert [q.perturbed for q in files.forget.items] == [("c", "d"), ("b",)]
    assert [q.paraphrased for q in files.forget.items] == ["a one", "two a"]
    assert files.retain.has_perturbed()
    assert files.inputs()["perturbed answers (data.perturbed)"] == {str(perturbed): sha256(perturbed)}


BAD_FILES = {  # file name -> rows of the forget file; the message's fragments
    "no answer": ([QA[0], {"question": "q two", "anwser": "x"}], ["f.jsonl: line 2: no 'answer'", "anwser"]),
    "not JSON": ([QA[0], QA[1], '{"question": "q"'], ["f.jsonl: line 3 is not JSON"]),
    "empty file": ([], ["f.jsonl is empty"]),
    "blank lines": (["", "  "], ["f.jsonl is empty"]),
    "a list row": ([[1, 2]], ["f.jsonl: line 1 is a JSON list"]),
    "empty answer": ([{"question": "q", "answer": " "}], ["line 1: 'answer' is empty"]),
    "neither": ([{"prompt": "q", "completion": "a"}], ["line 1: neither 'question' nor 'messages'", "prompt"]),
    "both": ([{**QA[0], **CHAT}], ["line 1: has both 'question' and 'messages'"]),
    "system turn": ([{"messages": [{"role": "system", "content": "s"}, *CHAT["messages"]]}],
                    ["line 1: 'messages' has the turns system, user, assistant"]),
    "ends with user": ([{"messages": CHAT["messages"][:1]}], ["line 1: the last turn", "not the assistant"]),
    "perturbed a string": ([{**QA[0], "perturbed": "x"}], ["line 1: 'perturbed' is not a non-empty list"]),
    "perturbed for some": ([{**QA[0], "perturbed": ["x"]}, QA[1]],
                           ["f.jsonl: line 2: no perturbed answers, while", "f.jsonl: line 1 has some"]),
    "in retain too": ([CHAT], ["r.jsonl: line 1: the same question and answer as", "f.jsonl: line 1"]),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, case):
    rows, fragments = BAD_FILES[case]
    forget, retain = write(tmp_path, "f.jsonl", rows), write(tmp_path, "r.jsonl", [CHAT])
    with pytest.raises(SafeEditError) as error:
        read_qa_files(forget, retain)
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message


@pytest.mark.parametrize(("perturbed", "holdout", "fragments"), [
    ([{"question": "q one", "perturbed": ["x"]}, {"question": "q zero", "perturbed": ["y"]}], None,
     ["p.jsonl: line 2: the question 'q zero' is not in"]),
    ([{"question": "q one", "perturbed": ["x"]}], None, ["f.jsonl: line 2: no perturbed answers"]),
    ([{"question": "q one", "perturbed": ["x"]}, {"question": "q one", "perturbed": ["y"]}], None,
     ["p.jsonl: line 2: the question 'q one' repeats", "p.jsonl: line 1"]),
    ([{"question": "q one"}], None, ["p.jsonl: line 1: no 'perturbed'"]),
    (None, [{"question": "q two", "answer": "b"}], ["h.jsonl: line 1: the question is also", "f.jsonl: line 2"]),
])
def test_perturbed_and_holdout_rows_must_fit_the_questions(tmp_path, perturbed, holdout, fragments):
    forget, retain = write(tmp_path, "f.jsonl", QA), write(tmp_path, "r.jsonl", [CHAT])
    extra = {"perturbed": write(tmp_path, "p.jsonl", perturbed) if perturbed else None,
             "holdout": write(tmp_path, "h.jsonl", holdout) if holdout else None}
    with pytest.raises(SafeEditError) as error:
        read_qa_files(forget, retain, **extra)
    assert all(f in str(error.value) for f in fragments), str(error.value)


def test_paths_and_encodings_are_named(tmp_path):
    retain = write(tmp_path, "r.jsonl", [CHAT])
    with pytest.raises(SafeEditError, match=r"data.forget: .*nope.jsonl: no such file"):
        read_qa_files(tmp_path / "nope.jsonl", retain)
    (tmp_path / "f.txt").write_text("q\ta\n")
    with pytest.raises(SafeEditError, match=r"unsupported file type .txt; write JSON Lines"):
        read_qa_files(tmp_path / "f.txt", retain)
    (tmp_path / "latin.jsonl").write_bytes('{"question": "caf\xe9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(SafeEditError, match="not UTF-8"):
        read_qa_files(tmp_path / "latin.jsonl", retain)
    rows, digest = read_rows(retain)
    assert digest == sha256(retain) and rows[0].fields == CHAT


# --- scenarios refused before any model loads: one line, nothing written ---------------------------------------


def example(built: Path, **changes) -> dict:
    """The example scenario with absolute paths into the built folder, some keys changed (None: removed)."""
    doc = yaml.safe_load(SCENARIO.read_text())
    folder = built / FOLDER
    doc["model"]["name"] = str(folder / "model")
    doc["reference"]["model"] = str(folder / "reference")
    doc["data"] = {key: str(built / value) for key, value in doc["data"].items()}
    for key, value in changes.items():
        node, *path = key.split(".")
        target = doc
        for part in [node, *path][:-1]:
            target = target[part]
        if value is None:
            target.pop([node, *path][-1], None)
        else:
            target[[node, *path][-1]] = value
    return doc


def scenario_case(id_: str, change, *fragments: str) -> pytest.param:
    """A `run` case: `change(ctx, doc)` breaks the example; refused while the scenario is validated."""
    def argv(c: Ctx) -> list[str]:
        doc = example(c.assets["built"])
        change(c, doc)
        return ["run", c.yaml(doc), "--out", c.out("run"), "--no-pdf"]
    return pytest.param(Case(id_, argv, 2, fragments), id=id_)


def data_file(role: str, rows) -> callable:
    def change(c: Ctx, doc: dict) -> None:
        doc["data"][role] = c.file(f"{role}.jsonl", "".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                             for r in rows))
    return change


def setting(key: str, value) -> callable:
    def change(c: Ctx, doc: dict) -> None:
        target = doc
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        if value is None:
            target.pop(last)
        else:
            target[last] = value(c) if callable(value) else value
    return change


def other_architecture(c: Ctx) -> str:
    folder = Path(c.folder("other"))
    config = json.loads((c.assets["built"] / FOLDER / "reference" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 16}))
    return str(folder)


MIA = [{"check": "npo+wagle.mia_auc <= 0.9"}]
SCENARIO_CASES = [
    scenario_case("files-forget-missing", setting("data.forget", lambda c: str(c.inputs / "nope.jsonl")),
                  "data.forget", "nope.jsonl: no such file"),
    scenario_case("files-row-without-answer", data_file("forget", [QA[0], {"question": "q"}]),
                  "forget.jsonl: line 2: no 'answer'"),
    scenario_case("files-invalid-json-line-3", data_file("retain", [QA[0], QA[1], "{oops"]),
                  "retain.jsonl: line 3 is not JSON"),
    scenario_case("files-empty-forget", data_file("forget", []), "forget.jsonl is empty"),
    scenario_case("files-perturbed-not-a-forget-question", data_file("perturbed", [{"question": "who",
                                                                                   "perturbed": ["x"]}]),
                  "perturbed.jsonl: line 1: the question 'who' is not in"),
    scenario_case("files-holdout-missing-for-mia", lambda c, d: (d["data"].pop("holdout"), d.update(criteria=MIA)),
                  "needs mia_auc", "give data.holdout"),
    scenario_case("files-forget-quality-without-reference",
                  lambda c, d: (d.pop("reference"), d.update(criteria=[{"check": "graddiff.forget_quality > 0.05"}])),
                  "needs forget_quality", "give reference: {model: PATH}"),
    scenario_case("files-truth-ratio-without-perturbed",
                  lambda c, d: (d["data"].pop("perturbed"),
                                d.update(criteria=[{"check": "graddiff.truth_ratio_forget > 0.5"}])),
                  "needs truth_ratio_forget", "give wrong answers for every forget question"),
    scenario_case("files-criterion-unknown-metric", setting("criteria", [{"check": "graddiff.ua > 0.5"}]),
                  "needs ua", "this scenario measures", "rouge_l_forget"),
    scenario_case("files-reference-missing", setting("reference.model", lambda c: str(c.inputs / "ref")),
                  "reference.model", "no such folder"),
    scenario_case("files-reference-other-architecture", setting("reference.model", other_architecture),
                  "reference.model", "is [66, 16], the model's [66, 32]"),
    scenario_case("files-finetune-is-for-authors", setting("finetune", {"epochs": 1}),
                  "finetune: applies to protocol fictitious-authors"),
    scenario_case("files-reference-with-capitals", setting("data", {"protocol": "capitals"}),
                  "reference: applies to your own files"),
    scenario_case("files-unknown-data-key", setting("data.heldout", "h.jsonl"), "data.files.heldout"),
]


@pytest.mark.parametrize("c", SCENARIO_CASES)
def test_bad_scenario_input(c: Case, built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    check_case(c, Ctx(tmp_path, {"built": built}), capsys, monkeypatch)


def test_files_without_a_protocol_and_with_one_are_the_same(built, tmp_path):
    docs = [example(built), example(built)]
    docs[1]["data"] = {"protocol": "files", **docs[1]["data"]}
    loaded = []
    for index, doc in enumerate(docs):
        path = tmp_path / f"s{index}.yaml"
        path.write_text(yaml.safe_dump(doc))
        loaded.append(load_scenario(path))
    assert loaded[0].model_dump() == loaded[1].model_dump() and loaded[0].data.protocol == "files"
    again = tmp_path / "again.yaml"  # the scenario as the record stores it validates again
    again.write_text(yaml.safe_dump(loaded[0].model_dump(mode="json")))
    assert load_scenario(again).model_dump() == loaded[0].model_dump()


# --- `safeedit mask` on the same files -----------------------------------------------------------------------------


def test_mask_reads_question_files_like_the_scenario(built, tmp_path, capsys):
    """`safeedit mask --score wagle` on question files is the mask `npo+wagle` computes from them (batch size 1,
    retain paired one per forget question in the scenario's order): the same rows, template and labels."""
    from safeedit.data.qa_files import read_qa_files as read
    from safeedit.models.language import load_language_model
    from safeedit.unlearn.lm_objectives import LMUnlearnData, paired_retain
    from safeedit.unlearn.wagle import LMUnlearnOptions, lm_mask

    folder = built / FOLDER
    files = read(folder / "forget.jsonl", folder / "retain.jsonl")
    paired = paired_retain(files.forget.chats(), files.retain.chats(), 0)
    retain = write(tmp_path, "paired.jsonl", [{"question": e.prompt, "answer": e.answer} for e in paired])
    out = tmp_path / "wagle.mask.safetensors"
    code = main(["mask", "--model", str(folder / "model"), "--score", "wagle", "--forget", str(folder / "forget.jsonl"),
                 "--retain", str(retain), "--batch-size", "1", "--max-length", "64", "--ratio", "0.1",
                 "--option", "gamma=1.0", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    mask = Mask.load(out)
    assert mask.metadata["examples_forget"] == "4" and mask.metadata["examples_retain"] == "4"
    loaded = load_language_model(str(folder / "model"), progress=False)
    expected = lm_mask(loaded.model, "wagle", LMUnlearnData(loaded.tokenizer, files.forget.chats(),
                                                            files.retain.chats(), 1, 64, 0),
                       LMUnlearnOptions(ratio=0.1, gamma=1.0), progress=False)
    assert mask.tensors.keys() == expected.tensors.keys()
    assert all(torch.equal(mask.tensors[name], expected.tensors[name]) for name in mask.tensors)


def test_mask_filters_question_files_and_refuses_them_for_a_classifier(built, tmp_path, capsys, monkeypatch):
    rows = [{"question": f"q {i}", "answer": f"a {i}", "topic": "cats" if i % 2 else "dogs"} for i in range(6)]
    forget = write(tmp_path, "topics.jsonl", rows)
    examples = spec_chat_examples(f"{forget}[topic=cats]")
    assert [e.prompt for e in examples] == ["q 1", "q 3", "q 5"]
    assert spec_chat_examples(str(write(tmp_path, "t.jsonl", [{"text": "plain text"}]))) is None  # the text path
    out = tmp_path / "m.safetensors"
    model = str(built / FOLDER / "model")
    assert main(["mask", "--model", model, "--score", "saliency", "--forget", f"{forget}[topic=dogs]",
                 "--ratio", "0.1", "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    assert Mask.load(out).metadata["examples_forget"] == "3"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad file was refused")

    bad = write(tmp_path, "bad.jsonl", [QA[0], {"question": "q"}])
    with monkeypatch.context() as patch:
        patch.setattr("safeedit.models.load_model", no_model)
        assert main(["mask", "--model", model, "--score", "saliency", "--forget", str(bad), "--ratio", "0.1",
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}: line 2: no 'answer'" in err
    classifier = _tiny_classifier(tmp_path / "classifier")
    assert main(["mask", "--model", classifier, "--score", "saliency", "--forget", str(forget), "--ratio", "0.1",
                 "--out", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "holds questions and answers" in err and "not one" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def _tiny_classifier(folder: Path) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=16)).save_pretrained(folder, safe_serialization=True)
    H.word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "q", "a"]).save_pretrained(folder)
    return str(folder)


def test_reference_ratios_give_forget_quality_as_the_ks_test(built):
    """Forget quality of the original against the reference is scipy's two-sample KS p-value of their per-question
    forget truth ratios (TOFU's definition), the ratios computed here from the two models' answer log-probs."""
    from scipy.stats import ks_2samp

    from safeedit.eval.language import answer_logprobs
    from safeedit.models.language import load_language_model

    folder = built / FOLDER
    files = read_qa_files(folder / "forget.jsonl", folder / "retain.jsonl", perturbed=folder / "perturbed.jsonl")
    items = files.forget.items

    def ratios(model, tokenizer):  # R = exp(-mean_j NLL(perturbed_j)) / exp(-NLL(answer)), NLL per token
        values = []
        for item in items:
            true = answer_logprobs(model, tokenizer, [item.question], [item.paraphrased])[0].double().mean()
            wrong = [lp.double().mean() for lp in answer_logprobs(model, tokenizer, [item.question] *
                                                                  len(item.perturbed), list(item.perturbed))]
            values.append(float(torch.exp(torch.stack(wrong).mean() - true)))
        return np.array(values)

    model, reference = (load_language_model(str(folder / name), progress=False) for name in ("model", "reference"))
    ours, theirs = ratios(model.model, model.tokenizer), ratios(reference.model, model.tokenizer)
    sets = QASets(items, files.retain.items[:2])
    measured = qa_metrics(model.model, model.tokenizer, sets, theirs, max_new_tokens=2)
    np.testing.assert_allclose(measured.forget_ratios, ours, rtol=1e-6)
    assert measured.metrics["forget_quality"] == pytest.approx(ks_2samp(ours, theirs).pvalue)


def test_a_reference_of_another_architecture_is_refused_after_loading_too():
    from safeedit.models.state import check_same_architecture

    model = H.make_llama(0)
    check_same_architecture(model, H.make_llama(1), "reference.model x")  # same network, other weights: fine
    with pytest.raises(SafeEditError, match=r"reference.model y: tensor .* belongs to another architecture"):
        check_same_architecture(model, H.make_gpt2(0), "reference.model y")
