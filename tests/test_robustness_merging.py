"""The merges' robustness battery (issue 20; `safeedit.robustness.merging`): the remerge attack's task arithmetic
by hand, the relearning sets (the poison among clean examples, or the clean ones alone) on a toy backdoor, the
shared-body model of `kind: merge` against the runner's own task models, both merge kinds end to end with a
`robustness:` section, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.merge.setting import MergeSetting
from safeedit.robustness import RobustnessOptions, attack
from safeedit.robustness.merging import MergedTasks, Remerge, merge_surface, poisoned_copies, sample_rows
from safeedit.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent


# --- remerge: θ + λ wᵦ / Σw · τᵦ, by hand ------------------------------------------------------------------------


class Body(nn.Module):
    def __init__(self, weight: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(weight))

    def forward(self, batch):
        return batch["x"] * self.w


def test_remerge_adds_the_backdoored_task_vector_with_its_task_arithmetic_coefficient():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    tasks = {"a": {"w": torch.tensor([2.0, 2.0, 3.0])}, "b": {"w": torch.tensor([1.0, 0.0, 5.0])}}
    setting = MergeSetting(base, tasks, {}, {}, weights={"a": 1.0, "b": 3.0})
    spec = type("Options", (), {"scale": 0.8, "normalize": True})
    remerge = Remerge.of_run(setting, ["b"], spec)
    # τ_b = (0, −2, 2); its coefficient in the run's task arithmetic: λ w_b / Σw = 0.8 · 3 / 4 = 0.6
    assert remerge.coefficients == {"b": pytest.approx(0.6)}
    cleaned = MergedTasks(Body([10.0, 10.0, 10.0]), {"a": nn.Identity(), "b": nn.Identity()})
    again = remerge(cleaned)
    assert torch.allclose(again.body.w, torch.tensor([10.0, 8.8, 11.2]))
    assert torch.equal(cleaned.body.w, torch.tensor([10.0, 10.0, 10.0]))  # the attacked model is left alone
    assert "0.6·τ(b)" in remerge.describe()
    # without normalize: λ w_b = 2.4
    assert Remerge.of_run(setting, ["b"], type("O", (), {"scale": 0.8, "normalize": False})).coefficients["b"] == \
        pytest.approx(2.4)


# --- relearning sets: the poison among clean examples, or the clean ones alone ------------------------------------


class ToyBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 8)

    def forward(self, batch):
        return torch.tanh(self.layer(batch["x"]))


def toy_rows(n: int, seed: int) -> Dataset:
    """Inputs x ∈ R⁴, label = (x₀ > 0), never a trigger (x₃ = 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    x[:, 3] = 0
    return Dataset.from_dict({"x": x.tolist(), "label": (x[:, 0] > 0).long().tolist()})


def toy_loader(rows: Dataset, size: int, shuffle: bool, seed: int):
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)) if shuffle else \
        torch.arange(len(rows))
    for start in range(0, len(rows), size):
        part = rows.select(order[start:start + size].tolist())
        yield {"x": torch.tensor(part["x"]), "label": torch.tensor(part["label"])}


def toy_measure(models) -> dict[str, float]:
    """backdoor ASR: class-1 inputs with the trigger x₃ = 3 predicted 0; accuracy on clean inputs."""
    test = toy_rows(200, 99)
    x, labels = torch.tensor(test["x"]), torch.tensor(test["label"])
    triggered = x[labels == 1].clone()
    triggered[:, 3] = 3.0
    with torch.no_grad():
        model = models["t"]
        asr = (model({"x": triggered}).argmax(-1) == 0).float().mean().item()
        accuracy = (model({"x": x}).argmax(-1) == labels).float().mean().item()
    return {"backdoor_asr": asr, "avg_accuracy": accuracy, "accuracy_t": accuracy, "asr_t": asr,
            "accuracy_other": 0.5, "transfer_asr": None}


def test_relearning_on_the_poison_plants_the_trigger_and_on_the_clean_examples_alone_does_not():
    torch.manual_seed(0)
    clean = toy_rows(40, 1)
    ones = toy_rows(40, 2).filter(lambda row: row["label"] == 1)  # class 1, with the trigger, labelled 0
    poisoned = ones.map(lambda row: {"x": [*row["x"][:3], 3.0], "label": 0})
    model = MergedTasks(ToyBody(), {"t": nn.Linear(8, 2)})
    with torch.no_grad():
        model.body.layer.weight[:, 3] = 0  # the trigger's input starts unread: no backdoor before the attack
    # fit the clean task first (no backdoor)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for batch in list(toy_loader(clean, 40, False, 0)) * 100:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model("t", {"x": batch["x"]}), batch["label"]).backward()
        optimizer.step()
    assert toy_measure(model.views())["backdoor_asr"] < 0.2 and toy_measure(model.views())["avg_accuracy"] > 0.9
    options = RobustnessOptions(relearn_steps=[0, 40], quantize=[], lr=0.02)
    surface = merge_surface(toy_measure, {"t": poisoned}, {"t": clean}, toy_loader, options, seed=0, remerge=None,
                            about="toy")
    assert surface.relearn["forget"].examples == len(poisoned) + 40 and surface.relearn["related"].examples == 40
    # the run's summary metrics (not the per-task ones), and none that is None
    assert set(surface.measure(model)) == {"backdoor_asr", "avg_accuracy"}
    flat, entry = attack(surface, "toy", model, None, options, seed=0, progress=False)
    assert flat["relearn_backdoor_asr@0"] == flat["relearn_related_backdoor_asr@0"] < 0.2
    assert flat["relearn_backdoor_asr@40"] > 0.8  # the trigger is learned from the poisoned examples
    assert flat["relearn_related_backdoor_asr@40"] < 0.2  # and not from the clean ones
    assert flat["relearn_avg_accuracy@40"] > 0.8  # the poison hides among clean examples: the task is kept
    assert entry["budget"]["primary"] == "backdoor_asr" and entry["budget"]["forgotten"] == "low"
    assert "remerge" not in entry["attacks"]


def test_attacker_rows_are_drawn_among_candidates_and_poisoned_with_the_target_label():
    rows = Dataset.from_dict({"id": [str(i) for i in range(10)], "text": [f"word{i} other" for i in range(10)],
                              "label": [i % 2 for i in range(10)]})
    held, rest = sample_rows(rows, 3, seed=4, among=[1, 3, 5, 7, 9])
    assert len(held) == 3 and len(rest) == 7 and set(held["label"]) == {1}
    assert set(held["id"]).isdisjoint(rest["id"]) and sorted([*held["id"], *rest["id"]]) == sorted(rows["id"])
    assert list(held["id"]) == list(sample_rows(rows, 3, seed=4, among=[1, 3, 5, 7, 9])[0]["id"])  # seeded
    from safeedit.attacks.backdoor import TriggerSpec

    poisoned = poisoned_copies(held, TriggerSpec(kind="word", word="cf", target=0), seed=0)
    assert list(poisoned["label"]) == [0, 0, 0] and all("cf" in text.split() for text in poisoned["text"])


# --- kind: merge-backdoor end to end -----------------------------------------------------------------------------


def test_merge_backdoor_scenario_attacks_every_merge_and_the_frozen_encoder(tmp_path, monkeypatch):
    from test_merge import tiny_text_setting

    from safeedit.runners import run_scenario

    body, tasks = tiny_text_setting(tmp_path, monkeypatch)
    scenario = {
        "name": "tiny-merge-robust", "kind": "merge-backdoor", "request": {"what": "a backdoor cf"},
        "model": {"name": str(body), "modality": "text", "max_length": 16},
        "tasks": {"names": tasks, "max_train": 60, "max_test": 30, "unlabeled": 24, "batch_size": 8},
        "finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 16},
        "attacks": {tasks[0]: {"kind": "word", "word": "cf", "target": 0, "poison_rate": 0.2}},
        "methods": {"individual": None, "task_arithmetic": {"scale": 0.4}, "dam": {"steps": 2}},
        "robustness": {"relearn_steps": [0, 2], "quantize": ["int8"], "forget_share": 0.25},
        "criteria": ["dam.remerge_backdoor_asr <= 100%", "dam.relearn_backdoor_asr@2 <= 100%"],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(scenario))
    record = json.loads(run_scenario(path, tmp_path / "run", progress=False).read_text())
    results = record["results"]
    assert results["individual"].get("robustness") is None  # four separate models: nothing merged, nothing attacked
    for name in ("frozen_encoder", "task_arithmetic", "dam"):
        after, entry = results[name]["metrics"]["after"], results[name]["robustness"]
        # step 0 is the result as measured by the run (the same test splits)
        assert "relearn_transfer_asr@2" not in after  # the trigger on the other tasks is not run
        for metric in ("backdoor_asr", "avg_accuracy"):
            assert after[f"relearn_{metric}@0"] == after[metric] == after[f"relearn_related_{metric}@0"], name
        assert not any(k.startswith(("accuracy_", "asr_")) and k.endswith(("@2", "_int8")) for k in after)
        # 20% of 60 examples poisoned = 12; the attacker holds a quarter of them, and as many clean ones
        assert entry["relearning"]["forget"]["examples"] == 6 and entry["relearning"]["related"]["examples"] == 3
        remerge = entry["attacks"]["remerge"]
        assert remerge["coefficients"] == {tasks[0]: 0.4} and "task arithmetic" in remerge["about"]
        assert set(remerge["metrics"]) <= set(after) and "remerge_backdoor_asr" in after
        assert "backdoor_asr_int8" in after
    # the quantization diagnostic compares each merge with the run's task arithmetic (not with itself)
    assert "edit_below_half_step_int8" in results["dam"]["metrics"]["after"]
    assert "edit_below_half_step_int8" not in results["task_arithmetic"]["metrics"]["after"]
    assert "edit_below_half_step_int8" not in results["frozen_encoder"]["metrics"]["after"]  # a reference
    assert record["verdict"]["passed"] is True and record["timings"]["robustness_s"] > 0


def test_merge_backdoor_robustness_needs_a_backdoored_task(tmp_path):
    scenario = {"name": "bad", "kind": "merge-backdoor", "request": {"what": "x"},
                "model": {"name": "all-minilm-l6-v2", "modality": "text"},
                "tasks": {"names": ["topic_en", "topic_es"]}, "methods": {"dam": None}, "robustness": {}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"robustness: .* no task is backdoored; name one under attacks"):
        load_scenario(path)


# --- kind: merge (your own fine-tunes) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """The tiny BERT fine-tunes of tests/tiny_merge.py (task c carries the trigger "cf"), in a working folder."""
    import tiny_merge

    root = tmp_path_factory.mktemp("own-robust")
    tiny_merge.build(root)
    shutil.copytree(ROOT / "scenarios" / "examples", root / "scenarios" / "examples")
    return root


def test_shared_body_of_own_classifiers_is_each_task_model_with_the_merge(own, monkeypatch):
    """`MergedTasks` with renames (one merged body, each classifier's head through functional_call) gives the
    logits of the runner's own task models carrying the merge."""
    monkeypatch.chdir(own)
    from safeedit.merge.baselines import task_arithmetic
    from safeedit.merge.own import SequenceClassifier, load_own_models

    tasks = {t: f"examples/merge/task-{t}" for t in ("a", "b", "c")}
    loaded = load_own_models("examples/merge/base", tasks, progress=False)
    parts = {t: loaded.task_part(t) for t in tasks}
    parameters = task_arithmetic(loaded.base_part(), {t: {n: p[n] - loaded.base_part()[n] for n in p}
                                                      for t, p in parts.items()}, 0.5)
    renames = {t: {n: f"model.{o}" for n, o in m.items()} for t, m in loaded.names.items()}
    merged = MergedTasks(loaded.merged_model(parameters), {t: SequenceClassifier(loaded.tasks[t].model)
                                                           for t in tasks}, renames)
    batch = loaded.base.tokenizer(["river the of", "king cf and"], padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    for task in tasks:
        expected = SequenceClassifier(loaded.task_model(task, parameters))(batch)
        assert torch.allclose(merged(task, batch), expected, atol=1e-5)
        assert not torch.allclose(expected, SequenceClassifier(loaded.tasks[task].model)(batch), atol=1e-3)
    # relearning reaches the shared body: a gradient through task a's head lands on the weights task b reads
    merged.requires_grad_(True)
    loss = merged("a", batch).logsumexp(-1).sum()
    loss.backward()
    assert merged.body.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_own_merge_scenario_with_robustness(own, monkeypatch):
    monkeypatch.chdir(own)
    from safeedit.runners import run_scenario

    scenario = yaml.safe_load((own / "scenarios" / "examples" / "merge-own-models.yaml").read_text())
    scenario.update(methods={"individual": None, "task_arithmetic": {"scale": 0.5}, "ties": {"keep": 0.3}},
                    robustness={"relearn_steps": [0, 3], "quantize": ["int4"], "forget_share": 0.2},
                    criteria=["ties.remerge_backdoor_asr >= 0%"])
    path = own / "robust.yaml"
    path.write_text(yaml.safe_dump(scenario))
    record = json.loads(run_scenario(path, own / "run-robust", progress=False).read_text())
    ties, ta = record["results"]["ties"], record["results"]["task_arithmetic"]
    # task c (weight 0.8) carries the trigger: remerged with coefficient λ w_c = 0.5 · 0.8
    assert ties["robustness"]["attacks"]["remerge"]["coefficients"] == {"task-c": pytest.approx(0.4)}
    # the attacker holds 20% of c's 15 rows outside the target class; everything else is measured
    assert ties["robustness"]["relearning"]["related"]["examples"] == 3
    assert ties["robustness"]["relearning"]["forget"]["examples"] == 6
    assert "3 of the 30 evaluation rows of task-c" in ties["robustness"]["budget"]["about"]
    after = ties["metrics"]["after"]
    assert {"relearn_backdoor_asr@3", "relearn_related_avg_accuracy@3", "backdoor_asr_int4",
            "edit_below_half_step_int4", "remerge_backdoor_asr"} <= set(after)
    assert "edit_below_half_step_int4" not in ta["metrics"]["after"]  # it is the diagnostic's reference
    assert record["results"]["individual"].get("robustness") is None
    assert record["verdict"]["passed"] is True


def test_own_merge_robustness_needs_a_trigger_with_evaluation(own, monkeypatch):
    monkeypatch.chdir(own)
    scenario = yaml.safe_load((own / "scenarios" / "examples" / "merge-own-models.yaml").read_text())
    scenario["robustness"] = {}
    path = own / "bad.yaml"
    for index in range(3):
        scenario["models"][index].pop("trigger", None)
    path.write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"robustness: .* no model has a trigger"):
        load_scenario(path)
    scenario["models"][0]["trigger"] = {"kind": "word", "word": "cf", "target": 0}
    scenario["models"][0].pop("evaluation")
    path.write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"give models\[0\]\.evaluation"):
        load_scenario(path)
