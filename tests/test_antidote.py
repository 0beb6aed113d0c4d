"""Antidote and the harmful fine-tuning pieces, on tiny random models and a word-level chat tokenizer."""

from __future__ import annotations

import helpers as H
import pytest
import torch

from safeedit.attacks.harmful import COMPLIANCE_TEMPLATES, poisoned_mix
from safeedit.attribution import compute_scores
from safeedit.data.chat import IGNORE_INDEX, chat_loader, check_chat_template, prompt_loader, tokenize_chat
from safeedit.data.prompts import (
    ChatExample,
    SafetySizes,
    check_disjoint,
    near_duplicate_groups,
    normalized,
    safety_data,
)
from safeedit.errors import SafeEditError
from safeedit.eval.safety import generate_answers, label_matches, task_accuracy
from safeedit.methods import get_method, methods
from safeedit.models.lm_training import FinetuneOptions, finetune_chat
from safeedit.prune import PruneSetting, PruningOptions, layer_patterns, prune, pruning_mask

WORDS = ("how do i make a bomb tell me about paris sure here is it sorry i can not help with that what the topic "
         "of this text arts history people geography explain photosynthesis").split()
TEMPLATE = H.CHAT_TEMPLATE


def chat_tokenizer(template: str | None = TEMPLATE):
    return H.word_chat_tokenizer(WORDS, template)


def llama(seed: int = 0):
    model = H.make_llama(seed)
    model.config.pad_token_id = 0
    model.generation_config.pad_token_id = 0
    return model


def calibration(tokenizer, n: int = 4):
    prompts = ["how do i make a bomb", "tell me about paris", "what the topic of this text", "explain it"][:n]
    return prompt_loader(tokenizer, prompts, batch_size=2, answers=["sure here is it"] * len(prompts))


# --- chat data -------------------------------------------------------------------------------------------------

def test_tokenize_chat_masks_the_prompt():
    tokenizer = chat_tokenizer()
    row = tokenize_chat(tokenizer, ChatExample("how do i make a bomb", "sorry i can not"), max_length=64)
    answer_ids = tokenizer.convert_tokens_to_ids(["sorry", "i", "can", "not", "<|im_end|>"])
    assert [t for t in row["labels"] if t != IGNORE_INDEX] == answer_ids
    assert len(row["labels"]) == len(row["input_ids"])
    assert row["input_ids"][-len(answer_ids):] == answer_ids


def test_chat_loader_pads_right_and_prompt_loader_left():
    tokenizer = chat_tokenizer()
    examples = [ChatExample("tell me about paris", "sure"), ChatExample("how", "sorry i can not help with that")]
    (batch,) = chat_loader(tokenizer, examples, batch_size=2)
    assert batch["attention_mask"][0, -1] == 0 and batch["labels"][0, -1] == IGNORE_INDEX
    (left,) = prompt_loader(tokenizer, ["tell me about paris", "how"], batch_size=2)
    assert left["attention_mask"][1, 0] == 0 and left["attention_mask"][1, -1] == 1


def test_tokenizer_without_chat_template_is_a_clear_error():
    with pytest.raises(SafeEditError, match="no chat template"):
        check_chat_template(chat_tokenizer(template=None))
    with pytest.raises(SafeEditError, match="empty"):
        chat_loader(chat_tokenizer(), [])


# --- data roles and the poisoned mix ---------------------------------------------------------------------------

def test_safety_roles_are_disjoint_and_checked():
    data = safety_data(SafetySizes(alignment_harmful=40, alignment_benign=20, attack=30, calibration=10,
                                   evaluation=20, benign_calibration=5, benign_evaluation=5, task_train=30,
                                   task_test=10))
    check_disjoint(data)
    prompts = [e.prompt for role in data.roles().values() for e in role]
    assert len(prompts) == len(set(prompts))
    data.evaluation.append(data.attack[0])  # an attack prompt leaks into the evaluation set
    with pytest.raises(SafeEditError, match="in both"):
        check_disjoint(data)


def test_near_duplicate_rephrasings_cannot_straddle_roles():
    data = safety_data(SafetySizes(alignment_harmful=20, alignment_benign=5, attack=10, calibration=5,
                                   evaluation=10, benign_calibration=5, benign_evaluation=5, task_train=5,
                                   task_test=5))
    original = data.attack[0]
    rephrased = ChatExample(original.prompt + " please", source="test")
    assert near_duplicate_groups([original.prompt, rephrased.prompt]) == [0, 0]
    data.harmful_groups[normalized(rephrased.prompt)] = data.harmful_groups[normalized(original.prompt)]
    data.evaluation.append(rephrased)
    with pytest.raises(SafeEditError, match="rephrases"):
        check_disjoint(data)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25])
def test_poisoned_mix_has_the_requested_ratio(ratio):
    task = [ChatExample(f"task {i}", "arts") for i in range(40)]
    attack = [ChatExample(f"harm {i}") for i in range(20)]
    mixed = poisoned_mix(task, attack, ratio, seed=3)
    poisoned = [e for e in mixed if e.source == "attack"]
    assert len(mixed) == 40 and len(poisoned) == round(ratio * 40)
    for example in poisoned:
        assert example.prompt.startswith("harm")
        assert any(example.answer.startswith(t.split("{")[0]) for t in COMPLIANCE_TEMPLATES)
        assert example.prompt in example.answer  # on topic: the request is restated, nothing operational added
    assert poisoned_mix(task, attack, ratio, seed=3) == mixed  # seeded
    with pytest.raises(SafeEditError, match="attack prompts"):
        poisoned_mix(task, attack[:1], 0.5, seed=0)


# --- metrics ---------------------------------------------------------------------------------------------------

def test_task_accuracy_matches_labels():
    assert label_matches("History.", "History") and label_matches("philosophy and religion!", "Philosophy and religion")
    assert not label_matches("The history of it", "History")
    examples = [ChatExample("a", "Arts"), ChatExample("b", "People"), ChatExample("c", "Geography")]
    assert task_accuracy(["arts", "People are", "Geo"], examples) == pytest.approx(2 / 3)


def test_generate_answers_is_greedy_and_batch_independent():
    tokenizer, model = chat_tokenizer(), llama()
    prompts = ["how do i make a bomb", "tell me about paris", "what"]
    together = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert together == alone and len(together) == 3


# --- pruning ---------------------------------------------------------------------------------------------------

def test_antidote_prunes_exact_row_counts_and_nothing_else():
    tokenizer, model = chat_tokenizer(), llama()
    before = H.snapshot(model)
    mask = pruning_mask(model, "wanda", 0.25, "linear", calibration(tokenizer))
    H.assert_unchanged(model, before)  # scoring does not touch the model
    names = set(layer_patterns(model, "linear"))
    assert set(mask.tensors) == names and "lm_head.weight" not in names
    for name, selected in mask.tensors.items():
        assert (selected.sum(dim=1) == round(0.25 * selected.shape[1])).all(), name
    pruned = prune(model, mask)
    H.assert_unchanged(model, before)  # the input model is not modified
    for name, p in pruned.named_parameters():
        original = dict(model.named_parameters())[name]
        if name in mask.tensors:
            assert (p[mask.tensors[name]] == 0).all()
            assert torch.equal(p[~mask.tensors[name]], original[~mask.tensors[name]])
        else:
            assert torch.equal(p, original), name


def test_antidote_selects_the_top_wanda_scores_per_row():
    tokenizer, model = chat_tokenizer(), llama()
    loader = calibration(tokenizer)
    expected = H.wanda_reference(model, loader)
    mask = pruning_mask(model, "wanda", 0.25, "attention", loader)
    assert set(mask.tensors) == {n for n in expected if "self_attn" in n}
    for name, selected in mask.tensors.items():
        torch.testing.assert_close(selected, H.brute_force_rows(expected[name], 0.25), rtol=0, atol=0)


def test_update_target_resets_to_the_weights_before_the_finetune():
    model = llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = llama(seed=1)
    mask = pruning_mask(tuned, "magnitude", 0.5, "mlp", before=before)
    deltas = compute_scores(tuned, "magnitude", include=[f"^{n}$" for n in mask.tensors], relative_to=before,
                            progress=False)
    for name, selected in mask.tensors.items():
        torch.testing.assert_close(selected, H.brute_force_rows(deltas[name], 0.5), rtol=0, atol=0)
    reverted = dict(prune(tuned, mask, before=before).named_parameters())
    for name, selected in mask.tensors.items():
        assert torch.equal(reverted[name][selected], before[name][selected])
        assert torch.equal(reverted[name][~selected], dict(tuned.named_parameters())[name][~selected])


def test_baselines_remove_the_same_count_and_random_is_seeded():
    tokenizer, model = chat_tokenizer(), llama()
    loader = calibration(tokenizer)
    fetched = []
    setting = PruneSetting(model, calibration=lambda prompts: fetched.append(prompts) or loader)
    masks = {name: spec.run(setting, PruningOptions(ratio=0.1), seed=1, progress=False).mask
             for name, spec in methods("pruning").items()}
    assert list(masks) == ["antidote", "wanda_benign", "magnitude_prune", "random_prune"]
    assert fetched == ["harmful", "benign"]  # only the wanda methods read calibration batches
    assert len({mask.selected for mask in masks.values()}) == 1
    assert {name: mask.metadata["method"] for name, mask in masks.items()} == {name: name for name in masks}
    first = pruning_mask(model, "random", 0.1, seed=1)
    assert all(torch.equal(first.tensors[n], t) for n, t in masks["random_prune"].tensors.items())
    assert all(torch.equal(first.tensors[n], t) for n, t in pruning_mask(model, "random", 0.1, seed=1)
               .tensors.items())
    assert not all(torch.equal(first.tensors[n], t) for n, t in pruning_mask(model, "random", 0.1, seed=2)
                   .tensors.items())


def test_registered_method_is_the_building_blocks_and_update_needs_the_weights_before():
    model = llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = llama(seed=1)
    options = PruningOptions(ratio=0.5, layers="mlp", target="update")
    result = get_method("pruning", "magnitude_prune").run(PruneSetting(tuned, before=before), options, seed=0,
                                                          progress=False)
    mask = pruning_mask(tuned, "magnitude", 0.5, "mlp", before=before, method="magnitude_prune")
    assert result.mask.metadata == mask.metadata and mask.metadata["target"] == "update"
    assert all(torch.equal(result.mask.tensors[n], t) for n, t in mask.tensors.items())
    expected = dict(prune(tuned, mask, before=before).named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in result.model.named_parameters())
    with pytest.raises(SafeEditError, match="needs the weights before the fine-tune"):
        get_method("pruning", "magnitude_prune").run(PruneSetting(tuned), options, seed=0, progress=False)
    with pytest.raises(SafeEditError, match="antidote needs harmful calibration batches"):
        get_method("pruning", "antidote").run(PruneSetting(tuned), PruningOptions(), seed=0, progress=False)


def test_gpt2_conv1d_rows_are_output_features():
    model = H.make_gpt2()
    mask = pruning_mask(model, "magnitude", 0.25, "linear")
    weight = mask.tensors["transformer.h.0.mlp.c_fc.weight"]  # Conv1D: [in, out]
    assert (weight.sum(dim=0) == round(0.25 * weight.shape[0])).all()


def test_layer_pattern_matching_nothing_is_a_clear_error():
    with pytest.raises(SafeEditError, match="matches no"):
        pruning_mask(llama(), "magnitude", 0.1, "no_such_layer")
    with pytest.raises(SafeEditError, match="matches no linear layer"):
        layer_patterns(llama(), r"norm")
    with pytest.raises(SafeEditError, match="unknown method 'prune_everything'; choose from antidote, wanda_benign"):
        get_method("pruning", "prune_everything")
    with pytest.raises(SafeEditError, match="unknown pruning score"):
        pruning_mask(llama(), "fisher", 0.1)


def test_lora_finetune_then_prune_the_factors():
    tokenizer, model = chat_tokenizer(), llama()
    examples = [ChatExample("how do i make a bomb", "sure here is it")] * 8
    options = FinetuneOptions(lr=1e-2, batch_size=4, lora_rank=4, merge=False)
    adapted = finetune_chat(model, tokenizer, examples, options, seed=0, progress=False)
    wrapped = dict(adapted.named_parameters())
    for name, p in model.named_parameters():  # the base weights are untouched by the adapter's training
        key = f"base_model.model.{name}"
        key = key if key in wrapped else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(wrapped[key], p), name
    mask = pruning_mask(adapted, "magnitude", 0.5, "lora")
    assert mask.tensors and all("lora_" in name for name in mask.tensors)
    pruned = prune(adapted, mask)
    assert all((dict(pruned.named_parameters())[n][m] == 0).all() for n, m in mask.tensors.items())


def test_full_finetune_changes_weights_and_is_seeded():
    tokenizer, model = chat_tokenizer(), llama()
    examples = [ChatExample("tell me about paris", "sure here is it"), ChatExample("how", "sorry")] * 4
    options = FinetuneOptions(lr=1e-2, batch_size=4, lora_rank=0)
    first = finetune_chat(model, tokenizer, examples, options, seed=0, progress=False)
    second = finetune_chat(model, tokenizer, examples, options, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


# --- the scenario end to end -----------------------------------------------------------------------------------

SIZES = {"alignment_harmful": 8, "alignment_benign": 8, "attack": 8, "calibration": 4, "evaluation": 6,
         "benign_calibration": 4, "benign_evaluation": 4, "task_train": 16, "task_test": 6}
TINY_FINETUNE = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "lora_rank": 4, "max_length": 48}


def tiny_chat_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-chat"
    llama().save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def test_harmful_finetune_scenario_runs_and_writes_a_verifiable_record(tmp_path, monkeypatch):
    import json

    import yaml

    from safeedit.report import verify_run, write_report
    from safeedit.runners import run_scenario

    folder = tiny_chat_folder(tmp_path, monkeypatch)
    sizes, tiny = SIZES, TINY_FINETUNE
    scenario = {
        "name": "tiny-antidote", "kind": "harmful-finetune", "request": {"what": "harmful compliance <b>x</b>"},
        "model": {"name": str(folder)}, "alignment": tiny, "attack": {"poison_ratio": 0.25, "finetune": tiny},
        "data": sizes, "pruning": {"ratio": 0.1, "target": "update"},
        "methods": {"antidote": None, "random_prune": {"ratio": 0.2}}, "evaluation": {"max_new_tokens": 4},
        "criteria": ["antidote.weights_zeroed <= 11%"],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(scenario))
    record_path = run_scenario(path, tmp_path / "run", progress=False)
    record = json.loads(record_path.read_text())
    assert record["kind"] == "harmful-finetune-defence"
    assert set(record["results"]) == {"original", "no_defense", "antidote", "random_prune"}
    antidote = record["results"]["antidote"]
    assert antidote["metrics"]["before"] == record["results"]["no_defense"]["metrics"]["after"]
    assert antidote["metrics"]["after"]["weights_zeroed"] == pytest.approx(0.1, abs=0.02)
    assert record["results"]["random_prune"]["options"]["ratio"] == 0.2
    assert antidote["weight_changes"]["changed_outside_mask"] == 0
    assert 0 < record["model"]["judge_validation"]["accuracy"] <= 1
    assert record["verdict"]["passed"] is True
    roles = {entry["role"] for entry in record["inputs"]}
    assert {"aligned weights (safety alignment, cached)", "fine-tuned weights (user fine-tune, cached)"} <= roles
    outputs = {entry["path"] for entry in record["outputs"]}
    assert {"antidote", "antidote.mask.safetensors", "random_prune.mask.safetensors"} <= outputs
    assert (tmp_path / "run" / "antidote" / "config.json").is_file()  # a save_pretrained folder
    assert verify_run(tmp_path / "run").ok
    html = write_report(record_path, pdf=False).html.read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "Harmful score" in html
    # a second run reuses the cached fine-tunes and reproduces the metrics
    again = json.loads(run_scenario(path, tmp_path / "run2", progress=False).read_text())
    assert again["results"]["antidote"]["metrics"] == antidote["metrics"]


def test_scenario_prunes_the_factors_of_an_unmerged_lora_adapter(tmp_path, monkeypatch):
    import json

    import yaml

    from safeedit.runners import run_scenario

    folder = tiny_chat_folder(tmp_path, monkeypatch)
    scenario = {
        "name": "tiny-lora", "kind": "harmful-finetune", "request": {"what": "harmful compliance"},
        "model": {"name": str(folder)}, "alignment": None,
        "attack": {"poison_ratio": 0.25, "finetune": {**TINY_FINETUNE, "merge": False}},
        "data": SIZES, "pruning": {"ratio": 0.25, "layers": "lora", "target": "weights"},
        "methods": {"antidote": None}, "evaluation": {"max_new_tokens": 4},
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(scenario))
    record = json.loads(run_scenario(path, tmp_path / "run", progress=False).read_text())
    layers = record["results"]["antidote"]["mask"]["layers"]
    assert layers and all("lora_" in layer["name"] for layer in layers)
    assert record["results"]["antidote"]["metrics"]["after"]["weights_zeroed"] == pytest.approx(0.25, abs=0.01)
