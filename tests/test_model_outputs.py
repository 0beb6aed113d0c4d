"""Edited models that load anywhere (issue 18, item 6): a run writes each Hugging Face model as a save_pretrained
folder with a model card, `from_pretrained` loads it with no copying, `verify` checks every file in it; a peft
LoRA adapter folder loads on its base, and an edit of the adapter alone is written as an adapter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import word_tokenizer
from safetensors.torch import load_file
from tiny_outputs import ADAPTER, BASE, TICKETS, WORDS, build, lora_adapter, tiny_bert

from safeedit.cli import main
from safeedit.data import make_loader
from safeedit.data.sources import load_train_test
from safeedit.errors import SafeEditError
from safeedit.io import sha256_file
from safeedit.masks import Mask
from safeedit.models import load_model
from safeedit.models.training import accuracy
from safeedit.record import listing_sha256
from safeedit.runners.common import OutputWriter

EXAMPLE = Path(__file__).parent.parent / "scenarios" / "examples" / "forget-customer-lora.yaml"
REQUEST = {"what": "every support ticket of customer C007", "requested_by": "the DPO",
           "reason": "erasure request (GDPR art. 17)"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The example files (tests/tiny_outputs.py): a tiny BERT classifier, a LoRA adapter on it, the tickets."""
    path = tmp_path_factory.mktemp("outputs")
    build(path)
    return path


def scenario(model: str, **extra) -> dict:
    return {"name": "forget-c007", "request": REQUEST, "model": {"name": model},
            "data": {"source": TICKETS.as_posix(), "test_split": 0.25},
            "forget": {"kind": "ids", "column": "customer_id", "ids": ["C007"]},
            "methods": {"ft": {"epochs": 1, "lr": 0.01, "batch_size": 16},
                        "salun": {"epochs": 1, "lr": 0.01, "batch_size": 16, "ratio": 0.5}},
            "evaluation": {"max_mia_examples": 10}, "threads": 1, **extra}


def held_out_accuracy(model, tokenizer) -> float:
    """Test accuracy of `model` on the scenario's held-out rows (the same seeded 25% the run held out)."""
    test = load_train_test(TICKETS.as_posix(), "train", 0.25, 0)[1]
    return accuracy(model, make_loader(test, model, tokenizer, batch_size=16))


@pytest.fixture(scope="module")
def full_run(root):
    """One run on the full BERT classifier (retrained reference, fine-tuning, SalUn), from the example folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        content = scenario(BASE.as_posix())
        content["model"]["recipe"] = {"epochs": 1, "lr": 1e-3, "batch_size": 16}
        (root / "full.yaml").write_text(yaml.safe_dump(content))
        assert main(["run", "full.yaml", "--out", "runs/full", "--no-pdf", "-q"]) == 0
    return root / "runs" / "full", json.loads((root / "runs" / "full" / "record.json").read_text())


def test_a_run_writes_folders_that_from_pretrained_loads(root, full_run, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.chdir(root)
    out, record = full_run
    entries = {entry["path"]: entry for entry in record["outputs"]}
    assert set(entries) == {"retrain", "ft", "salun", "salun.mask.safetensors"}  # the mask stays next to the folder
    assert entries["retrain"]["role"] == "reference model folder" and entries["salun"]["role"] == "edited model folder"
    base = AutoModelForSequenceClassification.from_pretrained(BASE).eval()
    for name in ("retrain", "ft", "salun"):
        folder, entry = out / name, entries[name]
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(entry["files"])
        assert entry["files"] == {p.name: sha256_file(p) for p in folder.iterdir()}
        assert entry["sha256"] == listing_sha256(entry["files"])
        assert entry["load"] == f'transformers.AutoModelForSequenceClassification.from_pretrained("runs/full/{name}")'
        model = eval(entry["load"], {"transformers": __import__("transformers")}).eval()  # the record's own line
        saved = load_file(folder / "model.safetensors")
        assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in saved.items())
        tokenizer = AutoTokenizer.from_pretrained(folder)  # the tokenizer travels with the weights, as it came
        assert (folder / "tokenizer.json").read_bytes() == (root / BASE / "tokenizer.json").read_bytes()
        # the loaded model is the one the run measured: the same test accuracy as the record's
        assert held_out_accuracy(model, tokenizer) == pytest.approx(record["results"][name]["metrics"]["after"]["ta"])
    salun = AutoModelForSequenceClassification.from_pretrained(out / "salun")
    mask = Mask.load(out / "salun.mask.safetensors")
    changed = {n: int((p != base.state_dict()[n]).sum()) for n, p in salun.named_parameters()}
    recorded = {layer["name"]: layer["changed"] for layer in record["results"]["salun"]["weight_changes"]["layers"]}
    assert {n: c for n, c in changed.items() if c} == {n: c for n, c in recorded.items() if c}
    for name, parameter in salun.named_parameters():  # outside the mask, the original's weights bit for bit
        outside = ~mask.tensors[name]
        assert torch.equal(parameter[outside], base.state_dict()[name][outside])


def test_the_model_card_names_method_request_and_weights(full_run):
    out, record = full_run
    card = (out / "salun" / "README.md").read_text()
    front, body = re.fullmatch(r"---\n(.*?)---\n(.*)", card, re.S).groups()
    matter = yaml.safe_load(front)
    assert matter["library_name"] == "transformers" and {"safeedit", "salun"} <= set(matter["tags"])
    assert "base_model" not in matter  # a local folder: the Hub accepts only hub ids there
    assert "**salun**" in body and REQUEST["what"] in body and REQUEST["reason"] in body
    assert sha256_file(out / "salun" / "model.safetensors") in body
    assert record["model"]["weights_sha256"] in body and "record.json" in body
    assert "- `ratio`: 0.5" in body
    assert "what exact unlearning would produce" in (out / "retrain" / "README.md").read_text()


def test_verify_checks_every_file_of_a_model_folder(full_run, tmp_path, capsys):
    out, _ = full_run
    assert main(["verify", str(out)]) == 0
    assert "salun/model.safetensors" in capsys.readouterr().out
    for change, expected in [
        (lambda f: (f / "salun" / "config.json").write_text("{}"), "salun/config.json: SHA-256 mismatch"),
        (lambda f: (f / "ft" / "notes.txt").write_text("x"), "ft/notes.txt: extra file"),
        (lambda f: (f / "retrain" / "tokenizer.json").unlink(), "retrain/tokenizer.json: missing"),
    ]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        change(copy)
        assert main(["verify", str(copy)]) == 1
        assert f"MISMATCH {expected}" in capsys.readouterr().out


def test_an_adapter_folder_loads_on_its_base(root, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(root)  # the adapter names its base by a path relative to here
    loaded = load_model(ADAPTER.as_posix(), progress=False)
    assert isinstance(loaded.model, PeftModel) and loaded.origin == "adapter" and loaded.tokenizer is not None
    assert {Path(p).name for p in loaded.files} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "model.safetensors"}
    assert loaded.adapter.base == BASE.as_posix()
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)  # the base is frozen
    by_hand = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE), ADAPTER).eval()
    batch = {"input_ids": torch.tensor([[2, 4, 5, 6, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        logits = loaded.model(**batch).logits
        assert torch.equal(logits, by_hand(**batch).logits)
        assert not torch.allclose(logits, AutoModelForSequenceClassification.from_pretrained(BASE)(**batch).logits)


def test_a_run_on_an_adapter_writes_an_adapter_or_the_merged_model(root, monkeypatch, capsys):
    """The example scenario: fine-tuning trains the adapter alone and is written as an adapter (so is the
    reference, a new adapter on the same base trained on the retain rows); SalUn's mask reaches base weights, so
    its edit is merged into the base and written whole."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.chdir(root)
    assert main(["run", str(EXAMPLE), "--out", "runs/lora", "--no-pdf", "-q"]) == 0, capsys.readouterr().err
    out = root / "runs" / "lora"
    record = json.loads((out / "record.json").read_text())
    entries = {entry["path"]: entry for entry in record["outputs"]}
    assert entries["ft"]["role"] == "edited model folder (LoRA adapter; the base model unchanged)"
    assert entries["retrain"]["role"] == "reference model folder (LoRA adapter; the base model unchanged)"
    assert entries["salun"]["role"] == "edited model folder (LoRA adapter merged into its base)"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(entries["ft"]["files"])
    assert "config.json" not in entries["ft"]["files"] and "model.safetensors" in entries["salun"]["files"]
    assert json.loads((out / "ft" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE.as_posix()
    assert entries["ft"]["load"] == 'peft.AutoPeftModelForSequenceClassification.from_pretrained("runs/lora/ft")'
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out / "ft").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "salun").eval()
    reference = AutoPeftModelForSequenceClassification.from_pretrained(out / "retrain").eval()
    for name, model in (("ft", adapter), ("salun", merged), ("retrain", reference)):
        assert held_out_accuracy(model, tokenizer) == pytest.approx(record["results"][name]["metrics"]["after"]["ta"])
    base = AutoModelForSequenceClassification.from_pretrained(BASE)
    body = {n: p for n, p in adapter.base_model.model.named_parameters() if "base_layer" in n}
    assert all(torch.equal(p, base.state_dict()[n.replace(".base_layer", "")]) for n, p in body.items())
    stored = load_file(ADAPTER / "adapter_model.safetensors")
    edited = load_file(out / "ft" / "adapter_model.safetensors")
    assert stored.keys() == edited.keys() and any(not torch.equal(stored[k], edited[k]) for k in stored)
    assert "peft" in (out / "ft" / "README.md").read_text() and load_model(str(out / "ft"), progress=False).adapter
    assert main(["verify", "runs/lora"]) == 0
    # same seed, same folders, byte for byte (the cards name no time and no run folder)
    assert main(["run", str(EXAMPLE), "--out", "runs/lora-again", "--no-pdf", "-q"]) == 0
    again = json.loads((root / "runs" / "lora-again" / "record.json").read_text())["outputs"]
    assert [(e["path"], e["sha256"]) for e in again] == [(e["path"], e["sha256"]) for e in record["outputs"]]


def bad_adapter(root: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(root / ADAPTER, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / BASE)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    change(folder, config)
    return folder


def rebase(base: Path):
    def change(folder: Path, config: dict) -> None:
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return change


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=16)).save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def two_layer_bert(folder: Path) -> Path:
    tiny_bert(layers=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change, words", [
    (rebase(Path("no/such/base")),
     r"its base model '.*no/such/base' \(base_model_name_or_path in adapter_config.json\) does not load: .*"
     r"set base_model_name_or_path to its folder or hub id"),
    (lambda f, c: rebase(tiny_llama(f.parent / "llama"))(f, c),
     r"the adapter does not fit its base .*llama.*Target modules .*set base_model_name_or_path in "
     r"adapter_config.json to that model"),
    (lambda f, c: rebase(two_layer_bert(f.parent / "bert2"))(f, c),
     r"does not fit its base .*bert2.*adapter tensor .*layer.1.* expected by the model, not in the file"),
    (lambda f, c: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
     r"no adapter_model.safetensors \(only pickled adapter_model.bin\); re-save the adapter"),
    (lambda f, c: (f / "adapter_config.json").write_text(json.dumps({**c, "base_model_name_or_path": None})),
     r"names no base model; set base_model_name_or_path"),
])
def test_an_adapter_that_cannot_load_is_one_line(root, tmp_path, change, words):
    folder = bad_adapter(root, tmp_path, change)
    with pytest.raises(SafeEditError, match=words) as error:
        load_model(str(folder), progress=False)
    assert "\n" not in str(error.value)


def test_a_run_on_a_misfit_adapter_stops_before_writing(root, tmp_path, monkeypatch, capsys):
    folder = bad_adapter(root, tmp_path, lambda f, c: rebase(tiny_llama(tmp_path / "llama"))(f, c))
    monkeypatch.chdir(root)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario(str(folder), retrain=None)))
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "run"), "--no-pdf", "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "does not fit its base" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_a_language_model_adapter_loads_through_the_language_loader(tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from safeedit.models.language import load_language_model

    base = tiny_llama(tmp_path / "llama")
    model = load_model(str(base), progress=False).model
    model.name_or_path = str(base)
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                     init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    loaded = load_language_model(str(tmp_path / "adapter"), progress=False)
    assert isinstance(loaded.model, PeftModel) and loaded.tokenizer is not None
    writer = OutputWriter(tmp_path / "out", "s", loaded.weights_sha256, processors=[loaded.tokenizer],
                          adapter=loaded.adapter)
    (tmp_path / "out").mkdir()
    ids = torch.tensor([[2, 4, 5, 6]])
    with torch.no_grad():
        writer.save_model("same", loaded.model, None)  # nothing of the base changed: an adapter
        before = loaded.model(input_ids=ids).logits
        loaded.model.base_model.model.model.layers[0].mlp.up_proj.weight.mul_(2)
        writer.save_model("edited", loaded.model, None)  # a base weight changed: the merged model
        after = loaded.model(input_ids=ids).logits
        assert not torch.allclose(before, after)
        assert (tmp_path / "out" / "same" / "adapter_config.json").is_file()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "edited")
        torch.testing.assert_close(merged(input_ids=ids).logits, after, atol=1e-5, rtol=1e-5)
        again = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "same")
        torch.testing.assert_close(again(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    assert writer.entries[0]["load"].startswith("peft.AutoPeftModelForCausalLM.from_pretrained(")
    assert writer.entries[1]["load"].startswith("transformers.AutoModelForCausalLM.from_pretrained(")


def test_weights_above_the_threshold_are_sharded_with_an_index(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    import safeedit.models.export

    monkeypatch.setattr(safeedit.models.export, "MAX_SHARD_SIZE", 8_000)  # bytes; the model is ~20 kB
    model = tiny_bert()
    (tmp_path / "out").mkdir()
    writer = OutputWriter(tmp_path / "out", "s", "0" * 64)
    writer.save_model("ft", model, None)
    files = writer.entries[0]["files"]
    shards = [name for name in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    card = (tmp_path / "out" / "ft" / "README.md").read_text()
    assert all(files[name] in card for name in shards)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "ft")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_model_without_save_pretrained_keeps_a_weights_file(tmp_path):
    from safeedit.models import SmallCNN, SmallCNNConfig

    (tmp_path / "out").mkdir()
    writer = OutputWriter(tmp_path / "out", "s", "0" * 64)
    writer.save_model("ga", SmallCNN(SmallCNNConfig()), None)
    assert writer.entries == [{"path": "ga.safetensors", "role": "edited weights",
                               "sha256": sha256_file(tmp_path / "out" / "ga.safetensors")}]


def test_lora_adapter_builder_makes_a_nontrivial_adapter():
    """The example adapter changes what the base computes (random, non-zero LoRA factors)."""
    model = lora_adapter(tiny_bert(), "base")
    factors = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert factors and all(p.abs().sum() > 0 for p in factors)
