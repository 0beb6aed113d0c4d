"""Merging core (task vectors, task arithmetic, TIES, Concrete gates, AdaMerging, DAM) and the merge scenario."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.merge import (
    AdaMergingOptions,
    ConcreteGates,
    DAMOptions,
    GateOptions,
    MergeSetting,
    adamerging,
    concrete_task_arithmetic,
    dam,
    merged_parameters,
    task_arithmetic,
    task_vectors,
    ties,
    ties_vector,
    trimmed,
)
from safeedit.merge.methods import TaskArithmeticOptions, TiesOptions
from safeedit.methods import get_method, methods


def state(**tensors: list) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in tensors.items()}


def test_task_arithmetic_by_hand():
    base = state(w=[1.0, 2.0, 3.0])
    vectors = task_vectors(base, {"a": state(w=[2.0, 2.0, 1.0]), "b": state(w=[1.0, 4.0, 3.0])})
    assert torch.equal(vectors["a"]["w"], torch.tensor([1.0, 0.0, -2.0]))
    merged = task_arithmetic(base, vectors, scale=0.5)
    # θ₀ + 0.5 · ((1, 0, -2) + (0, 2, 0)) = (1.5, 3, 2)
    assert torch.allclose(merged["w"], torch.tensor([1.5, 3.0, 2.0]))


def test_ties_trim_elect_disjoint_mean_by_hand():
    vectors = {"a": state(w=[3.0, -1.0, 2.0, 0.5]), "b": state(w=[1.0, 2.0, -4.0, 0.1]),
               "c": state(w=[-2.0, 0.2, -1.0, 0.3])}
    # keep 50%: a keeps 3, 2; b keeps 2, -4; c keeps -2, -1
    assert torch.equal(trimmed(vectors["a"], 0.5)["w"], torch.tensor([3.0, 0.0, 2.0, 0.0]))
    merged = ties_vector(vectors, keep=0.5)["w"]
    # entry 0: trimmed (3, 0, -2) -> sum +1, elected +, mean of agreeing {3} = 3
    # entry 1: (0, 2, 0) -> +, mean {2} = 2;  entry 2: (2, -4, -1) -> sum -3, elected -, mean {-4, -1} = -2.5
    # entry 3: nothing kept -> 0
    assert torch.allclose(merged, torch.tensor([3.0, 2.0, -2.5, 0.0]))
    base = state(w=[0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(ties(base, vectors, keep=0.5, scale=0.5)["w"], 0.5 * merged)


def test_merging_identical_models_returns_that_model():
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.weight.add_(torch.randn_like(tuned.weight))
    models = {"a": tuned, "b": copy.deepcopy(tuned), "c": copy.deepcopy(tuned)}
    vectors = task_vectors(base, models)
    base_params = dict(base.named_parameters())
    for merged in (task_arithmetic(base_params, vectors, scale=1 / 3), ties(base_params, vectors, keep=1.0)):
        for name, tensor in tuned.named_parameters():
            assert torch.allclose(merged[name], tensor, atol=1e-6)


def test_layerwise_coefficients_and_mask():
    base = state(w=[1.0, 1.0], b=[0.0])
    vectors = {"a": state(w=[1.0, 2.0], b=[1.0]), "b": state(w=[3.0, 0.0], b=[-1.0])}
    coefficients = {"a": {"w": 1.0, "b": 0.5}, "b": {"w": 0.0, "b": 0.5}}
    mask = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0])}
    merged = merged_parameters(base, vectors, coefficients, mask)
    assert torch.equal(merged["w"], torch.tensor([2.0, 1.0])) and torch.equal(merged["b"], torch.tensor([0.0]))


def test_mismatched_architectures_name_the_first_differing_tensor():
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    wider = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    with pytest.raises(SafeEditError, match=r"tensor '0.weight' is \(5, 4\).*base has \(3, 4\)"):
        task_vectors(base, {"a": copy.deepcopy(base), "wide": wider})
    with pytest.raises(SafeEditError, match=r"tensor '2\.weight' is not in the base model"):
        task_vectors(base, {"a": nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2))})
    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken[1].bias[0] = float("nan")
    with pytest.raises(SafeEditError, match="NaN"):
        task_vectors(base, {"a": broken})


def test_concrete_gates_sample_and_deterministic_mask():
    gates = ConcreteGates({"w": torch.Size([1000])}, init_logit=0.0)
    with torch.no_grad():
        gates.logits["w"][:500] = 4.0
        gates.logits["w"][500:] = -4.0
    sample = gates.sample(torch.Generator().manual_seed(0))["w"]
    assert ((sample >= 0) & (sample <= 1)).all() and ((sample > 0.05) & (sample < 0.95)).any()  # relaxed, not 0/1
    assert sample[:500].mean() > 0.9 and sample[500:].mean() < 0.1
    mask = gates.mask({"method": "test"})
    assert mask.tensors["w"][:500].all() and not mask.tensors["w"][500:].any()
    assert mask.metadata["method"] == "test"


# --- learned merges on a tiny differentiable body -----------------------------------------------------------


class TinyBody(nn.Module):
    """A body with the encoder interface: forward(batch, delta) and the trigger helpers DAM uses."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.delta_step = 0.1

    def forward(self, batch, delta=None):
        x = batch["x"] if delta is None else batch["x"] + delta
        return self.layer(x)

    def new_delta(self, generator):
        return torch.zeros(6)

    def project_delta(self, delta):
        return delta.clamp(-0.5, 0.5)


def tiny_setting(seed: int = 0) -> MergeSetting:
    torch.manual_seed(seed)
    body = TinyBody()
    tasks, heads = {}, {}
    for index, task in enumerate(("a", "b", "c")):
        tuned = copy.deepcopy(body)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.3 * torch.randn_like(p))
        tasks[task], heads[task] = tuned, nn.Linear(8, 3 + index)
    data = {task: [{"x": torch.randn(5, 6)} for _ in range(3)] for task in tasks}
    return MergeSetting(body, tasks, heads, data)


def test_adamerging_lowers_entropy_and_keeps_coefficients_in_range():
    setting = tiny_setting()
    batches = {task: setting.batch(task) for task in setting.tasks}
    start = setting.entropy_loss(setting.parameters(torch.full((3,), 0.3)), batches)
    merged, coefficients = adamerging(setting, AdaMergingOptions(granularity="layer", steps=30, lr=0.05),
                                      progress=False)
    assert coefficients.shape == (3, len(setting.names))
    assert coefficients.min() >= 0 and coefficients.max() <= 1
    assert setting.entropy_loss(merged, batches) < start


def test_concrete_task_arithmetic_uses_its_final_mask():
    setting = tiny_setting()
    merged, mask = concrete_task_arithmetic(setting, GateOptions(steps=5, init_logit=0.2, lr=0.5), seed=0,
                                            progress=False)
    gates = {name: tensor.float() for name, tensor in mask.tensors.items()}
    expected = setting.parameters(torch.full((3,), 0.3), gates)
    assert all(torch.allclose(merged[name], expected[name]) for name in merged)
    assert 0 < mask.density < 1  # the gates moved, some both ways


def test_dam_masks_are_deterministic_for_a_seed_and_differ_across_seeds():
    options = DAMOptions(steps=4, init_logit=0.2, lr=0.5, trigger_steps=2)
    first, second = dam(tiny_setting(), options, seed=0, progress=False), dam(tiny_setting(), options, seed=0,
                                                                                  progress=False)
    other = dam(tiny_setting(), options, seed=1, progress=False)
    for mask in ("shared_mask", "backdoor_mask"):
        a, b, c = getattr(first, mask), getattr(second, mask), getattr(other, mask)
        assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
        assert any(not torch.equal(a.tensors[n], c.tensors[n]) for n in a.tensors)
    assert all(torch.equal(first.parameters[n], second.parameters[n]) for n in first.parameters)
    # the merge is θ₀ + Σ λᵢ (M₁ ⊙ M₂ ⊙ τᵢ) with the returned masks and coefficients
    gates = {n: (first.shared_mask.tensors[n] & first.backdoor_mask.tensors[n]).float() for n in first.parameters}
    expected = tiny_setting().parameters(first.coefficients, gates)
    assert all(torch.allclose(first.parameters[n], expected[n], atol=1e-6) for n in expected)
    assert set(first.triggers) == {"a", "b", "c"} and all(t.abs().max() <= 0.5 for t in first.triggers.values())


def test_registered_merges_are_the_helpers_with_their_options():
    setting = tiny_setting()
    assert list(methods("merge"))[:6] == ["individual", "task_arithmetic", "ties", "adamerging", "concrete_ta", "dam"]
    assert methods("merge")["individual"].run(setting, methods("merge")["individual"].options()).parameters is None
    result = get_method("merge", "task_arithmetic").run(setting, TaskArithmeticOptions(scale=0.4), 0, False)
    expected = task_arithmetic(setting.base, setting.vectors, 0.4)
    assert all(torch.equal(result.parameters[n], expected[n]) for n in expected) and not result.masks
    result = get_method("merge", "ties").run(setting, TiesOptions(keep=0.5, scale=0.7), 0, False)
    expected = ties(setting.base, setting.vectors, 0.5, 0.7)
    assert all(torch.equal(result.parameters[n], expected[n]) for n in expected)
    options = GateOptions(steps=3, init_logit=0.2, lr=0.5)
    result = get_method("merge", "concrete_ta").run(setting, options, 0, False)
    parameters, _ = concrete_task_arithmetic(tiny_setting(), options, seed=0, progress=False)
    assert list(result.masks) == ["concrete_ta"] and all(torch.equal(result.parameters[n], parameters[n])
                                                         for n in parameters)
    options = DAMOptions(steps=2, init_logit=0.2, lr=0.5, trigger_steps=1)
    result = get_method("merge", "dam").run(tiny_setting(), options, 1, False)
    direct = dam(tiny_setting(), options, seed=1, progress=False)
    assert list(result.masks) == ["dam-shared", "dam-backdoor"] and result.mask is None
    assert result.details["coefficients"] == dict(zip(setting.tasks, direct.coefficients.tolist(), strict=True))
    assert all(torch.equal(result.parameters[n], direct.parameters[n]) for n in direct.parameters)
    result = get_method("merge", "adamerging").run(tiny_setting(), AdaMergingOptions(steps=2), 0, False)
    assert set(result.details["coefficients_mean"]) == {"a", "b", "c"} and result.parameters is not None


# --- the merge-backdoor scenario end to end, on a tiny random BERT and generated tasks -----------------------


def tiny_text_setting(tmp_path, monkeypatch):
    """A tiny random BERT body (the real MiniLM tokenizer) and three generated keyword tasks saved to disk."""
    import random

    import transformers
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from safeedit.models.encoders import minilm_folder

    monkeypatch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    body = tmp_path / "tiny-bert"
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(body)
    tokenizer.save_pretrained(body)
    words = "river mountain city music paint war king science sport food".split()
    folders = []
    for index, keywords in enumerate((("river", "mountain", "city"), ("music", "paint", "war"),
                                      ("king", "science", "sport"))):
        rng = random.Random(index)
        features = Features({"id": Value("string"), "text": Value("string"),
                             "label": ClassLabel(names=list(keywords))})

        def rows(split: str, n: int, keywords=keywords, rng=rng, features=features) -> Dataset:
            items = []
            for i in range(n):
                label = i % 3
                text = " ".join([keywords[label], *rng.sample(words, 4)])
                items.append({"id": f"{split}:{i}", "text": text, "label": label})
            return Dataset.from_list(items, features=features)

        folder = tmp_path / f"task{index}"
        DatasetDict(train=rows("train", 90), test=rows("test", 30)).save_to_disk(folder)
        folders.append(str(folder))
    return body, folders


def test_merge_scenario_runs_end_to_end_and_writes_a_verifiable_record(tmp_path, monkeypatch):
    import yaml

    from safeedit.masks import Mask
    from safeedit.report import verify_run, write_report
    from safeedit.runners import run_scenario

    body, tasks = tiny_text_setting(tmp_path, monkeypatch)
    scenario = {
        "name": "tiny-merge", "kind": "merge-backdoor", "request": {"what": "a backdoor <i>cf</i>"},
        "model": {"name": str(body), "modality": "text", "max_length": 16},
        "tasks": {"names": tasks, "max_train": 60, "max_test": 30, "unlabeled": 24, "batch_size": 8},
        "finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 16},
        "attacks": {tasks[0]: {"kind": "word", "word": "cf", "target": 0, "poison_rate": 0.2}},
        "methods": {"individual": None, "task_arithmetic": None, "ties": {"keep": 0.5},
                    "adamerging": {"steps": 2}, "concrete_ta": {"steps": 2}, "dam": {"steps": 2},
                    "dare": {"density": 0.9}},
        "criteria": ["dam.avg_accuracy >= 0%"],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(scenario))
    record_path = run_scenario(path, tmp_path / "run", progress=False)
    record = json.loads(record_path.read_text())
    assert record["kind"] == "merge-backdoor-defence"
    assert set(record["results"]) == {"frozen_encoder", "individual", "task_arithmetic", "ties", "adamerging",
                                      "concrete_ta", "dam", "dare"}
    for name, result in record["results"].items():  # each merge's about is its registered summary and limitations
        if name != "frozen_encoder":
            assert result["about"] == get_method("merge", name).about
    for result in record["results"].values():
        after = result["metrics"]["after"]
        assert {f"accuracy_{t}" for t in tasks} | {f"asr_{t}" for t in tasks} <= set(after)
        assert after["avg_accuracy"] == pytest.approx(sum(after[f"accuracy_{t}"] for t in tasks) / 3)
        assert after["backdoor_asr"] == after[f"asr_{tasks[0]}"]
    # 20% of the 60 fine-tuning examples of the attacked task were poisoned, and nothing else
    assert record["data"][f"{tasks[0]}_train"]["count"] == 60
    outputs = {entry["path"] for entry in record["outputs"]}
    assert {"dam-shared.mask.safetensors", "dam-backdoor.mask.safetensors", "concrete_ta.mask.safetensors",
            "dam", "task-heads.safetensors"} <= outputs
    dam = next(entry for entry in record["outputs"] if entry["path"] == "dam")
    assert dam["role"] == "merged body folder" and dam["load"].startswith("transformers.AutoModel.from_pretrained(")
    shared = Mask.load(tmp_path / "run" / "dam-shared.mask.safetensors")
    assert shared.metadata["mask"] == "task-shared (M1)" and 0 < shared.density <= 1
    assert record["results"]["dam"]["mask"]["layers"]
    assert verify_run(tmp_path / "run").ok
    html = write_report(record_path, pdf=False).html.read_text()
    assert "a backdoor &lt;i&gt;cf&lt;/i&gt;" in html and "Backdoor ASR" in html
    # the cached task models and a fixed seed reproduce every metric
    again = json.loads(run_scenario(path, tmp_path / "run2", progress=False).read_text())
    assert {k: v["metrics"] for k, v in again["results"].items()} == {k: v["metrics"]
                                                                      for k, v in record["results"].items()}


def test_merge_scenario_rejects_an_attack_on_an_unknown_task(tmp_path):
    import yaml

    from safeedit.scenario import load_scenario

    scenario = {"name": "bad", "kind": "merge-backdoor", "request": {"what": "x"},
                "model": {"name": "all-minilm-l6-v2", "modality": "text"},
                "tasks": {"names": ["topic_en", "topic_es"]},
                "attacks": {"occupation": {"kind": "word"}}, "methods": {"dam": None}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"attacks\.occupation names no task"):
        load_scenario(path)
    scenario["attacks"] = {}
    scenario["methods"] = {"dam": {"stepz": 3}}
    path.write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"methods\.dam: stepz"):
        load_scenario(path)


def test_merge_command_merges_hf_models_and_refuses_mismatched_ones_without_writing(tmp_path, capsys):
    import transformers

    from safeedit.cli import main

    def bert(hidden: int, seed: int) -> transformers.BertModel:
        torch.manual_seed(seed)
        return transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=16))

    base = bert(8, 0)
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.encoder.layer[0].output.dense.weight.add_(1.0)
    tuned.save_pretrained(tmp_path / "task")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "task"), "--scale", "0.5",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.BertModel.from_pretrained(tmp_path / "merged")
    expected = base.encoder.layer[0].output.dense.weight + 0.5
    assert torch.allclose(merged.encoder.layer[0].output.dense.weight, expected)
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["method"] == "task_arithmetic"
    assert "**task_arithmetic**" in (tmp_path / "merged" / "README.md").read_text()  # the runs' model card
    # defaults come from the options classes and the effective values are recorded
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "task"), "--out", str(tmp_path / "default")]) == 0
    recorded = json.loads((tmp_path / "default" / "merge.json").read_text())
    assert recorded["scale"] == TaskArithmeticOptions().scale and recorded["keep"] is None
    merged = transformers.BertModel.from_pretrained(tmp_path / "default")
    assert torch.allclose(merged.encoder.layer[0].output.dense.weight,
                          base.encoder.layer[0].output.dense.weight + TaskArithmeticOptions().scale)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "task"), "--method", "ties",
                 "--out", str(tmp_path / "ties")]) == 0
    recorded = json.loads((tmp_path / "ties" / "merge.json").read_text())
    assert (recorded["scale"], recorded["keep"]) == (TiesOptions().scale, TiesOptions().keep)
    # DARE: the drop-and-rescale vectors of the seed, then task arithmetic
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "task"), "--method", "dare", "--density", "0.5",
                 "--seed", "3", "--scale", "1", "--out", str(tmp_path / "dare")]) == 0
    recorded = json.loads((tmp_path / "dare" / "merge.json").read_text())
    assert (recorded["method"], recorded["density"], recorded["seed"], recorded["scale"]) == ("dare", 0.5, 3, 1.0)
    merged = transformers.BertModel.from_pretrained(tmp_path / "dare").encoder.layer[0].output.dense.weight
    delta = merged - base.encoder.layer[0].output.dense.weight
    kept = delta.abs() > 1.0  # kept entries moved by 1 / 0.5 = 2, dropped ones by 0
    assert kept.any() and (~kept).any()
    assert torch.allclose(delta[kept], torch.full_like(delta[kept], 2.0)) and delta[~kept].abs().max() < 1e-6
    code = main(["merge", str(tmp_path / "base"), str(tmp_path / "task"), "--keep", "0.5",
                 "--out", str(tmp_path / "unread")])
    assert code == 2 and "--keep does not apply to --method task_arithmetic" in capsys.readouterr().err
    code = main(["merge", str(tmp_path / "base"), str(tmp_path / "task"), "--method", "dare", "--density", "0",
                 "--out", str(tmp_path / "zero")])
    assert code == 2 and "--density: " in capsys.readouterr().err and not (tmp_path / "zero").exists()

    bert(16, 1).save_pretrained(tmp_path / "other")
    code = main(["merge", str(tmp_path / "base"), str(tmp_path / "other"), "--out", str(tmp_path / "bad")])
    assert code == 2 and not (tmp_path / "bad").exists()
    assert "tensor 'embeddings.word_embeddings.weight' is (50, 16)" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad") or "tmp" in p.name]


def test_image_trigger_is_a_small_blended_stamp_and_text_trigger_a_bounded_soft_token():
    import transformers

    from safeedit.models.encoders import ImageEncoder, TextEncoder, minilm_folder

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    encoder = ImageEncoder(transformers.ViTModel(config, add_pooling_layer=False).eval(), trigger_pixels=5)
    delta = encoder.new_delta(torch.Generator().manual_seed(0))
    assert delta.shape == (2, 1, 8, 8)
    moved = encoder.project_delta(delta + torch.randn_like(delta) * 10)
    assert (moved[0] > -6).sum() <= 5 and moved.abs().max() <= 6
    pixels = torch.rand(3, 1, 8, 8)
    stamped = torch.sigmoid(moved[0]) * torch.sigmoid(moved[1]) + (1 - torch.sigmoid(moved[0])) * pixels
    assert encoder({"pixel_values": pixels}, moved).shape == (3, 16)
    assert torch.allclose(encoder({"pixel_values": pixels}, moved), encoder({"pixel_values": stamped}))

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32), add_pooling_layer=False).eval()
    text = TextEncoder(bert, tokenizer, max_length=8)
    batch = text.collate([{"text": "a river city", "label": 1}, {"text": "music", "label": 0}])
    assert batch["label"].tolist() == [1, 0] and "token_type_ids" not in batch
    soft = text.project_delta(torch.full((16,), 100.0))
    assert soft.norm() == pytest.approx(text.delta_radius, rel=1e-5)
    features = text({k: v for k, v in batch.items() if k != "label"}, soft)
    assert features.shape == (2, 16) and not torch.allclose(features, text({k: v for k, v in batch.items()
                                                                              if k != "label"}))
