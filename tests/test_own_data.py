"""A user's own classifier and CSV (issue 18, part 1): forget one customer's rows by a text id column or a filter,
and a single file gets a held-out test set, never its own training rows."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import yaml
from helpers import word_tokenizer

from safeedit.cli import main
from safeedit.data import load_data
from safeedit.data.forget import ForgetRequest, split_forget
from safeedit.data.sources import load_train_test
from safeedit.errors import SafeEditError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "late", "paid", "refund", "card", "loan", "ok"]
CUSTOMERS = [f"C{n:03d}" for n in range(1, 11)]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A tiny BERT classifier saved with save_pretrained, and a CSV of 60 support tickets of 10 customers."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=2))
    model.save_pretrained(root / "ticket-classifier", safe_serialization=True)
    word_tokenizer(WORDS).save_pretrained(root / "ticket-classifier")
    rng = random.Random(0)
    rows = ["id,customer_id,text,label"]
    for index in range(60):
        words = rng.choices(WORDS[4:], k=4)
        rows.append(f"{index},{CUSTOMERS[index % 10]},{' '.join(words)},{int('late' in words)}")
    (root / "tickets.csv").write_text("\n".join(rows) + "\n")
    return root


def test_forget_one_customer_by_a_text_id_column_or_a_filter(user_files):
    train = load_data(str(user_files / "tickets.csv"))
    by_ids = split_forget(train, ForgetRequest(kind="ids", column="customer_id", ids=["C007"]))
    assert set(by_ids.forget["customer_id"]) == {"C007"} and len(by_ids.forget) == 6  # rows 6, 16, ..., 56
    assert "C007" not in set(by_ids.retain["customer_id"]) and len(by_ids.retain) == 54
    by_mapping = split_forget(train, ForgetRequest(kind="where", where={"customer_id": "C007"}))
    by_text = split_forget(train, ForgetRequest(kind="where", where="customer_id=C007"))
    assert by_ids.fingerprints() == by_mapping.fingerprints() == by_text.fingerprints()
    two = split_forget(train, ForgetRequest(kind="where", where="customer_id!=C007,label=1"))
    assert set(two.forget["label"]) == {1} and "C007" not in set(two.forget["customer_id"])
    assert split_forget(train, ForgetRequest(kind="ids", ids=[0, 59])).fingerprints()["forget"]["count"] == 2


@pytest.mark.parametrize("request_, words", [
    ({"kind": "ids", "column": "customer_id", "ids": ["C999"]},
     "['C999'] are not in the training data (column 'customer_id')"),
    ({"kind": "ids", "column": "client", "ids": ["C007"]}, "forget.column 'client' is not a column"),
    ({"kind": "ids", "ids": ["C007"]}, "are text but column 'id' holds numbers"),
    ({"kind": "where", "where": {"region": "north"}}, "filter column 'region' not in the training data"),
    ({"kind": "where", "where": "customer_id~C007"}, "not understood; write COLUMN=VALUE"),
])
def test_a_request_the_data_cannot_answer_is_one_line(user_files, request_, words):
    train = load_data(str(user_files / "tickets.csv"))
    with pytest.raises(SafeEditError, match=re.escape(words)):
        split_forget(train, ForgetRequest(**request_))


def test_column_is_only_for_ids():
    with pytest.raises(ValueError, match="does not read 'column'"):
        ForgetRequest(kind="class", label=1, column="customer_id")


def test_a_single_file_is_never_its_own_test_set(user_files):
    csv = str(user_files / "tickets.csv")
    with pytest.raises(SafeEditError, match=r"single file, one split \('train'\).*test_split: 0.2"):
        load_train_test(csv, "train", "test", 0)
    train, test, note = load_train_test(csv, "train", 0.25, seed=3)
    assert (len(train), len(test)) == (45, 15) and not set(train["id"]) & set(test["id"])
    again, _, _ = load_train_test(csv, "train", 0.25, seed=3)
    assert again["id"] == train["id"] and "seeded 25%" in note  # the same seed holds out the same rows
    with pytest.raises(SafeEditError, match="test_split is the training split"):
        load_train_test("digits", "train", "train", 0)


def test_scenario_forgets_a_customer_of_a_user_model_and_csv(user_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scenario = {
        "name": "forget-c007",
        "request": {"what": "every support ticket of customer C007", "reason": "erasure request (GDPR art. 17)"},
        "model": {"name": str(user_files / "ticket-classifier"), "recipe": {"epochs": 1, "lr": 1e-3, "batch_size": 16}},
        "data": {"source": str(user_files / "tickets.csv"), "test_split": 0.25},
        "forget": {"kind": "ids", "column": "customer_id", "ids": ["C007"]},
        "methods": {"ft": {"epochs": 1, "lr": 0.01, "batch_size": 16}},
        "evaluation": {"max_mia_examples": 10},
        "threads": 1,
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    before = (user_files / "tickets.csv").read_bytes()
    assert main(["run", "s.yaml", "--out", "run", "--no-pdf", "-q"]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    held_out = load_train_test(str(user_files / "tickets.csv"), "train", 0.25, 0)[1]
    assert record["data"]["test"]["count"] == len(held_out) == 15
    # C007's rows that were not held out for testing are the forget set
    assert record["data"]["forget"]["count"] == 6 - sum(1 for i in held_out["id"] if i % 10 == 6)
    assert any("seeded 25%" in note for note in record["notes"])
    assert (user_files / "tickets.csv").read_bytes() == before
    assert main(["verify", "run"]) == 0
    one_file = {**scenario, "data": {"source": scenario["data"]["source"]}}  # no test_split: no test set
    (tmp_path / "one-file.yaml").write_text(yaml.safe_dump(one_file))
    assert main(["run", "one-file.yaml", "--out", "run2", "--no-pdf", "-q"]) == 2
    assert "single file" in capsys.readouterr().err and not (tmp_path / "run2").exists()
