"""Merging your own models (issue 18, part 5): mergekit's task arithmetic, TIES and DARE definitions with per-model
weights and densities (known answers written from mergekit's formulas, by hand), `safeedit merge --config` on a
mergekit YAML, the `kind: merge` scenario on three tiny BERT fine-tunes, and bad input refused in one line.

mergekit (arcee-ai/mergekit, `merge_methods/generalized_task_arithmetic.py`, `sparsify.py`): per tensor, each task
vector δᵢ = θᵢ − θ₀ is trimmed to its int(density · n) largest |δ| (TIES) or dropped at random (DARE), weighted by
wᵢ; TIES elects +1 where Σᵢ wᵢ δᵢ ≥ 0 and −1 elsewhere and keeps the entries whose sign equals it; the kept
wᵢ δᵢ are summed and, with normalize, divided by the sum of the kept entries' weights (a zero sum counts as 1);
task arithmetic divides by Σᵢ wᵢ; λ multiplies the result, which is added to θ₀.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers as H
import pytest
import torch
import yaml

from safeedit.cli import main
from safeedit.merge.baselines import ties_vector
from safeedit.merge.dare import dare_vectors
from safeedit.merge.setting import MergeSetting
from safeedit.methods import get_method

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "examples" / "merge-own-models.yaml"


def tensors(**values: list[float]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}


def setting(base: dict, vectors: dict[str, dict], weights: dict | None = None,
            densities: dict | None = None) -> MergeSetting:
    tasks = {task: {name: base[name] + delta[name] for name in base} for task, delta in vectors.items()}
    return MergeSetting(base, tasks, {}, {}, weights, densities)


def merge(method: str, merge_setting: MergeSetting, **options) -> dict[str, torch.Tensor]:
    spec = get_method("merge", method)
    return spec.run(merge_setting, spec.options(**options), 0, False).parameters


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, list[float]], atol: float = 1e-6) -> None:
    for name, values in expected.items():
        assert torch.allclose(got[name], torch.tensor(values), atol=atol, rtol=0), (name, got[name], values)


# --- known answers, from mergekit's formulas ---------------------------------------------------------------


def test_task_arithmetic_with_per_model_weights():
    base = tensors(w=[1.0, 2.0, 3.0])
    vectors = {"a": tensors(w=[1.0, 0.0, -2.0]), "b": tensors(w=[0.0, 2.0, 0.0]), "c": tensors(w=[-1.0, 0.0, 1.0])}
    weights = {"a": 0.5, "b": 2.0, "c": 1.0}
    # Σ wᵢ δᵢ = 0.5·(1, 0, −2) + 2·(0, 2, 0) + (−1, 0, 1) = (−0.5, 4, 0); λ = 0.7
    plain = merge("task_arithmetic", setting(base, vectors, weights), scale=0.7)
    assert_close(plain, {"w": [1 - 0.35, 2 + 2.8, 3.0]})
    # normalize: divided by Σ wᵢ = 3.5 first: (−1/7, 8/7, 0) · 0.7 = (−0.1, 0.8, 0)
    normalized = merge("task_arithmetic", setting(base, vectors, weights), scale=0.7, normalize=True)
    assert_close(normalized, {"w": [0.9, 2.8, 3.0]})


def test_ties_per_tensor_with_densities_weights_and_normalize():
    base = tensors(w=[0.0, 0.0, 0.0, 0.0], b=[0.0, 0.0])
    vectors = {"a": tensors(w=[4.0, -1.0, 2.0, 0.5], b=[1.0, -3.0]),
               "b": tensors(w=[-3.0, 2.0, 0.1, 1.0], b=[2.0, 0.5]),
               "c": tensors(w=[1.0, -2.0, -3.0, 0.2], b=[-1.0, 0.1])}
    weights, densities = {"a": 1.0, "b": 2.0, "c": 0.5}, {"a": 0.5, "b": 0.5, "c": 0.75}
    # trimmed per tensor, k = int(density · n): a w k=2 (4, 0, 2, 0), b k=1 (0, −3); b w (−3, 2, 0, 0), b (2, 0);
    # c w k=3 (1, −2, −3, 0), b k=int(1.5)=1 (−1, 0). Weighted: a ×1, b ×2, c ×0.5.
    # w0: 4 − 6 + 0.5 = −1.5 → −; only b agrees: −6 / 2 = −3.  w1: 0 + 4 − 1 = 3 → +: b, 4 / 2 = 2.
    # w2: 2 + 0 − 1.5 = 0.5 → +: a, 2 / 1 = 2.  w3: nothing kept: sum 0 elects +, no entry agrees: 0.
    # b0: 0 + 4 − 0.5 = 3.5 → +: b, 4 / 2 = 2.  b1: −3 → −: a, −3 / 1 = −3.  Then λ = 0.5.
    merged = merge("ties", setting(base, vectors, weights, densities), keep=0.2, scale=0.5)
    assert_close(merged, {"w": [-1.5, 1.0, 1.0, 0.0], "b": [1.0, -1.5]})
    # normalize off: the kept weighted sums, times λ
    merged = merge("ties", setting(base, vectors, weights, densities), keep=0.2, scale=0.5, normalize=False)
    assert_close(merged, {"w": [-3.0, 2.0, 1.0, 0.0], "b": [2.0, -1.5]})
    # the method's keep is every task's density where the setting gives none: 0.5 everywhere changes c alone
    merged = merge("ties", setting(base, vectors, weights), keep=0.5, scale=1.0)
    # c now keeps (0, −2, −3, 0), (−1, 0) ×0.5: w0 4 − 6 = −2 → −6/2 = −3; w1 4 − 1 = 3 → 2; w2 2 − 1.5 → 2
    assert_close(merged, {"w": [-3.0, 2.0, 2.0, 0.0], "b": [2.0, -3.0]})


def test_ties_a_weighted_sum_of_zero_elects_plus():
    base = tensors(w=[0.0])
    # 1 · 1 + 0.5 · (−2) = 0: mergekit elects + (sum ≥ 0) and divides by the agreeing weight 1
    merged = merge("ties", setting(base, {"a": tensors(w=[1.0]), "b": tensors(w=[-2.0])}, {"a": 1.0, "b": 0.5}),
                   keep=1.0)
    assert_close(merged, {"w": [1.0]})
    # FusionBench's sign(sum) elects nothing for the same sum
    global_trim = merge("ties", setting(base, {"a": tensors(w=[1.0]), "b": tensors(w=[-2.0])},
                                        {"a": 1.0, "b": 0.5}), keep=1.0, trim="global")
    assert_close(global_trim, {"w": [0.0]})


def test_ties_density_below_one_entry_keeps_the_largest():
    # int(0.2 · 3) = 0: mergekit stops ("not gonna zero out the whole tensor"); we keep max(1, k) = the largest
    merged = merge("ties", setting(tensors(w=[0.0, 0.0, 0.0]), {"a": tensors(w=[0.1, -0.7, 0.3])}), keep=0.2)
    assert_close(merged, {"w": [0.0, -0.7, 0.0]})


def test_ties_all_equal_task_vectors():
    # equal magnitudes: k = int(0.5 · 4) = 2 entries are kept (ties go to the lower flat index)
    kept = ties_vector({"a": tensors(w=[0.5, 0.5, 0.5, 0.5])}, keep=0.5)["w"]
    assert kept.tolist() == [0.5, 0.5, 0.0, 0.0]
    # three equal task vectors with any weights: the weighted mean of equal values is that value
    same = {task: tensors(w=[3.0, -1.0, 2.0, 0.5]) for task in "abc"}
    merged = merge("ties", setting(tensors(w=[1.0, 1.0, 1.0, 1.0]), same, {"a": 1.0, "b": 2.0, "c": 3.0}), keep=0.5)
    assert_close(merged, {"w": [4.0, 1.0, 3.0, 1.0]})


def test_dare_rescales_as_mergekit_or_as_the_paper():
    vector = {"a": tensors(w=[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])}
    for rescale in ("l1", "none", "density"):
        sparse = dare_vectors(vector, 0.5, seed=1, rescale=rescale)["a"]["w"]
        kept = sparse != 0
        assert kept.any() and (~kept).any()
        original = vector["a"]["w"]
        factor = {"l1": original.abs().sum() / original[kept].abs().sum(), "none": 1.0, "density": 2.0}[rescale]
        assert torch.allclose(sparse[kept], original[kept] * factor)
    assert dare_vectors(vector, 0.5, seed=1, rescale="l1")["a"]["w"].abs().sum() == pytest.approx(36.0)
    # density 1 keeps everything: dare_linear is then task arithmetic
    base = tensors(w=[0.0] * 8)
    merged = merge("dare", setting(base, vector), density=1.0, scale=1.0, rescale="l1")
    assert torch.equal(merged["w"], vector["a"]["w"])


# --- safeedit merge --config on a mergekit YAML, end to end -----------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The tiny models and files of tests/tiny_merge.py, built once."""
    import tiny_merge

    root = tmp_path_factory.mktemp("own-merge")
    tiny_merge.build(root)
    return root


@pytest.fixture
def here(built, tmp_path, monkeypatch) -> Path:
    """A working folder holding examples/merge (linked to the built files), as a user's would."""
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "merge").symlink_to(built / "examples" / "merge")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parameters(folder: str | Path) -> dict[str, torch.Tensor]:
    """A saved model's parameters as float32, the way mergekit's inputs are read."""
    from safetensors.torch import load_file

    return {name: t.float() for name, t in load_file(Path(folder) / "model.safetensors").items()}


def mergekit_ties(base: dict, models: list[tuple[dict, float, float]], lam: float) -> dict[str, torch.Tensor]:
    """mergekit's TIES written out (weights, densities, normalize on), with max(1, k) in place of its assert."""
    merged = {}
    for name, theta0 in base.items():
        deltas, weights = [], []
        for params, weight, density in models:
            delta = (params[name] - theta0).flatten()
            k = max(1, int(density * delta.numel()))
            keep = torch.zeros_like(delta)
            keep[torch.argsort(delta.abs(), descending=True, stable=True)[:k]] = 1
            deltas.append((delta * keep).reshape(theta0.shape))
            weights.append(weight)
        stacked = torch.stack(deltas)
        w = torch.tensor(weights).reshape(-1, *([1] * theta0.dim()))
        weighted = stacked * w
        majority = (weighted.sum(dim=0) >= 0).float() * 2 - 1
        mask = (weighted.sign() == majority).float()
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        merged[name] = theta0 + lam * (weighted * mask).sum(dim=0) / divisor
    return merged


def test_merge_config_ties_is_mergekit_ties_and_verifies(here, capsys):
    assert main(["merge", "--config", "examples/merge/merge.yaml", "--out", "merged"]) == 0, capsys.readouterr().err
    config = yaml.safe_load(Path("examples/merge/merge.yaml").read_text())
    theta0 = parameters(config["base_model"])
    global_density = config["parameters"]["density"]
    models = [(parameters(m["model"]), m["parameters"]["weight"], m["parameters"].get("density", global_density))
              for m in config["models"]]
    expected = mergekit_ties(theta0, models, lam=config["parameters"]["lambda"])
    merged = parameters("merged")
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6, rtol=0), name
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained("merged").dtype == torch.float32  # dtype: float32
    record = json.loads(Path("merged/record.json").read_text())
    assert record["kind"] == "model-merge" and record["command"].startswith("safeedit merge --config")
    assert record["results"]["ties"]["options"] == {"keep": 0.3, "scale": 0.9, "trim": "tensor", "normalize": True}
    assert record["model"]["tasks"]["llama-b"] == {**record["model"]["tasks"]["llama-b"], "weight": 0.5,
                                                   "density": 0.7}
    assert record["model"]["excluded"] == {} and "lm_head.weight" in record["model"]["merged_tensors"]
    assert any("int8_mask" in note for note in record["notes"])
    assert {e["role"] for e in record["inputs"]} >= {"merge configuration", "base model", "task model llama-a"}
    assert json.loads(Path("merged/merge.json").read_text())["scale"] == 0.9
    capsys.readouterr()
    assert main(["verify", "merged"]) == 0


def test_merge_config_task_arithmetic_and_linear_with_weights(here, capsys):
    weights = {"llama-a": 1.0, "llama-b": 0.5, "llama-c": 2.0}
    models = [{"model": f"examples/merge/{n}", "parameters": {"weight": w}} for n, w in weights.items()]
    theta0 = parameters("examples/merge/llama-base")
    thetas = {n: parameters(f"examples/merge/{n}") for n in weights}
    total = sum(weights.values())
    for method, extra, out in (("task_arithmetic", {"lambda": 0.5, "normalize": True}, "ta"),
                               ("task_arithmetic", {"lambda": 0.5}, "ta-plain"), ("linear", {}, "linear")):
        config = {"merge_method": method, "base_model": "examples/merge/llama-base", "models": models,
                  "parameters": extra, "dtype": "float32"}
        Path(f"{out}.yaml").write_text(yaml.safe_dump(config))
        assert main(["-q", "merge", "--config", f"{out}.yaml", "--out", out]) == 0, capsys.readouterr().err
        merged = parameters(out)
        for name, base in theta0.items():
            weighted = sum(weights[n] * thetas[n][name] for n in weights)
            if method == "linear":  # Σ wᵢ θᵢ / Σ wᵢ
                expected = weighted / total
            else:  # θ₀ + λ Σ wᵢ δᵢ (/ Σ wᵢ)
                delta = sum(weights[n] * (thetas[n][name] - base) for n in weights)
                expected = base + 0.5 * (delta / total if extra.get("normalize") else delta)
            assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0), (method, out, name)
    # the merge is written in the configuration's dtype, the arithmetic being float32
    config = {"merge_method": "task_arithmetic", "base_model": "examples/merge/llama-base", "models": models,
              "dtype": "bfloat16"}
    Path("bf16.yaml").write_text(yaml.safe_dump(config))
    assert main(["-q", "merge", "--config", "bf16.yaml", "--out", "bf16"]) == 0
    from safetensors.torch import load_file

    saved = load_file("bf16/model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    name = "model.layers.0.mlp.up_proj.weight"
    expected = theta0[name] + sum(weights[n] * (thetas[n][name] - theta0[name]) for n in weights)
    assert torch.equal(saved[name], expected.to(torch.bfloat16))


def test_merge_config_dare_ties_without_a_drop_is_the_sign_consensus_sum(here, capsys):
    # density 1 drops nothing (and the L1 rescale is then 1); dare_ties' normalize defaults to false in mergekit:
    # θ₀ + λ Σ over agreeing entries of wᵢ δᵢ, the sign elected from Σᵢ wᵢ δᵢ ≥ 0
    weights = {"llama-a": 1.0, "llama-b": 0.5, "llama-c": 2.0}
    config = {"merge_method": "dare_ties", "base_model": "examples/merge/llama-base", "dtype": "float32",
              "models": [{"model": f"examples/merge/{n}", "parameters": {"weight": w}} for n, w in weights.items()],
              "parameters": {"lambda": 0.5}}
    Path("dare.yaml").write_text(yaml.safe_dump(config))
    assert main(["-q", "merge", "--config", "dare.yaml", "--out", "dare"]) == 0, capsys.readouterr().err
    theta0 = parameters("examples/merge/llama-base")
    thetas = {n: parameters(f"examples/merge/{n}") for n in weights}
    merged = parameters("dare")
    for name, base in theta0.items():
        weighted = torch.stack([w * (thetas[n][name] - base) for n, w in weights.items()])
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        expected = base + 0.5 * (weighted * (weighted.sign() == elected)).sum(dim=0)
        assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0), name
    options = json.loads(Path("dare/record.json").read_text())["results"]["dare"]["options"]
    assert options == {"density": 1.0, "scale": 0.5, "rescale": "l1", "sign_election": True, "normalize": False}


def test_merge_command_keeps_classifier_heads_unless_asked(here, capsys):
    # two classifiers with the same head shape: their heads are each task's own, kept from the base by default
    base, task = parameters("examples/merge/task-a"), parameters("examples/merge/task-c")
    assert main(["-q", "merge", "examples/merge/task-a", "examples/merge/task-c", "--scale", "1",
                 "--out", "kept"]) == 0, capsys.readouterr().err
    record = json.loads(Path("kept/record.json").read_text())
    assert set(record["model"]["excluded"]) == {"classifier.weight", "classifier.bias"}
    assert record["results"]["task_arithmetic"]["options"] == {"scale": 1.0, "normalize": False}
    kept = parameters("kept")
    assert torch.equal(kept["classifier.weight"], base["classifier.weight"])
    assert torch.allclose(kept["bert.pooler.dense.weight"], task["bert.pooler.dense.weight"], atol=1e-6)
    assert main(["-q", "merge", "examples/merge/task-a", "examples/merge/task-c", "--scale", "1", "--merge-heads",
                 "--out", "merged"]) == 0
    assert json.loads(Path("merged/record.json").read_text())["model"]["excluded"] == {}
    assert torch.allclose(parameters("merged")["classifier.weight"], task["classifier.weight"], atol=1e-6)
    assert json.loads(Path("kept/merge.json").read_text())["scale"] == 1.0
    capsys.readouterr()
    assert main(["verify", "kept"]) == 0


# --- the kind: merge scenario on three tiny BERT fine-tunes ---------------------------------------------------


def test_scenario_merges_own_classifiers_end_to_end(here, capsys):
    assert main(["-q", "run", str(SCENARIO), "--out", "run", "--no-pdf"]) == 0, capsys.readouterr().err
    record = json.loads(Path("run/record.json").read_text())
    assert record["kind"] == "model-merge"
    assert set(record["results"]) == {"individual", "task_arithmetic", "ties", "dare", "adamerging", "dam"}
    tasks = ("task-a", "task-b", "task-c")
    for name, result in record["results"].items():
        after = result["metrics"]["after"]
        assert all(0 <= after[f"accuracy_{t}"] <= 1 for t in tasks), name
        assert after["avg_accuracy"] == pytest.approx(sum(after[f"accuracy_{t}"] for t in tasks) / 3)
        assert after["backdoor_asr"] == after["asr_task-c"]
    individual = record["results"]["individual"]["metrics"]["after"]
    assert individual["avg_accuracy"] > 0.9 and individual["asr_task-c"] > 0.9  # the planted trigger works alone
    assert "classifier head" in record["model"]["excluded"]["classifier.weight"]
    assert "classifier.weight" not in record["model"]["merged_tensors"]
    assert record["results"]["ties"]["weight_changes"]["changed"] > 0
    # task arithmetic's written weights: θ₀ + 0.5 Σ wᵢ δᵢ with the scenario's weights 1, 1, 0.8
    from safetensors.torch import load_file

    written = load_file("run/task_arithmetic/model.safetensors")
    theta0 = parameters("examples/merge/base")
    thetas = [parameters(f"examples/merge/{t}") for t in tasks]
    for name, base in theta0.items():
        delta = sum(w * (t[f"bert.{name}"] - base) for w, t in zip((1.0, 1.0, 0.8), thetas, strict=True))
        assert torch.allclose(written[name], base + 0.5 * delta, atol=1e-6, rtol=0), name
    assert {e["role"] for e in record["inputs"]} >= {"scenario", "unlabeled data task-a", "evaluation data task-c"}
    capsys.readouterr()
    assert main(["verify", "run"]) == 0
    # each merge is a folder from_pretrained loads as it is: the base's body with the merged weights
    assert H.changed_tensors_of_loaded_folder(record, "run", "task_arithmetic", "AutoModel", "examples/merge/base") > 0


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------------


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if "examples" not in p.parts}


def refused(argv: list[str], root: Path, capsys, *fragments: str) -> None:
    before = files(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safeedit: error:"), err
    assert all(f in err[0] for f in fragments), (err[0], fragments)
    assert files(root) == before


def config(here: Path, **changes) -> str:
    doc = yaml.safe_load(Path("examples/merge/merge.yaml").read_text())
    for key, value in changes.items():
        if value is ...:
            doc.pop(key)
        else:
            doc[key] = value
    (here / "bad.yaml").write_text(yaml.safe_dump(doc))
    return "bad.yaml"


MODELS = [{"model": "examples/merge/llama-a", "parameters": {"weight": 1.0}},
          {"model": "examples/merge/llama-b", "parameters": {"weight": 1.0}}]


@pytest.mark.parametrize("changes, fragments", [
    ({"merge_method": "slerp"}, ("merge_method", "'slerp' is not supported", "task_arithmetic, ties")),
    ({"parameters": {"density": 0}}, ("parameters.density", "not in (0, 1]")),
    ({"models": [{"model": "examples/merge/llama-a", "parameters": {"weight": 1, "density": 1.5}}]},
     ("models[0].parameters.density", "1.5 is not in (0, 1]")),
    ({"parameters": {"epsilon": 0.1}}, ("parameters.epsilon", "not a parameter of ties", "weight, density")),
    ({"models": [{"model": "examples/merge/llama-a", "parameters": {"density": 0.5}}]}, ("models[0]", "no weight")),
    ({"parameters": {"density": [0.2, 0.5]}}, ("parameters.density", "lists")),
    ({"slices": []}, ("slices", "layer-wise")),
    ({"models": [*MODELS, {"model": "examples/merge/no-such-model", "parameters": {"weight": 1}}]},
     ("no-such-model", "no such model folder")),
    ({"models": [*MODELS, {"model": "examples/merge/task-a", "parameters": {"weight": 1}}]},
     ("task model examples/merge/task-a is a bert model", "share the base model's architecture")),
    ({"merge_method": "task_arithmetic", "models": MODELS, "parameters": {"rescale": True}},
     ("parameters.rescale", "dare")),
    ({"dtype": "int8"}, ("dtype", "'int8' is not supported")),
])
def test_bad_mergekit_configuration_is_one_line(here, capsys, changes, fragments):
    refused(["merge", "--config", config(here, **changes), "--out", "merged"], here, capsys, *fragments)


def test_bad_merge_arguments_are_one_line(here, capsys):
    from transformers import BertConfig, BertModel

    refused(["merge", "--config", "examples/merge/merge.yaml", "--scale", "0.5", "--out", "m"], here, capsys,
            "--scale does not go with --config")
    refused(["merge", "examples/merge/base", "--out", "m"], here, capsys, "at least one task model")
    BertModel(BertConfig(vocab_size=24, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(here / "narrow")
    before = files(here)
    assert main(["merge", "examples/merge/base", "examples/merge/task-a", "narrow", "--out", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task model narrow: tensor 'embeddings.word_embeddings.weight' is (24, 8)" in err[0]
    assert files(here) == before
    shutil.rmtree(here / "narrow")


def scenario(here: Path, **changes) -> str:
    doc = yaml.safe_load(SCENARIO.read_text())
    doc.update(changes)
    (here / "s.yaml").write_text(yaml.safe_dump(doc))
    return "s.yaml"


def test_bad_merge_scenarios_are_one_line(here, capsys):
    doc = yaml.safe_load(SCENARIO.read_text())
    no_unlabeled = [{k: v for k, v in m.items() if k != "unlabeled"} if i == 1 else m
                    for i, m in enumerate(doc["models"])]
    refused(["run", scenario(here, models=no_unlabeled), "--out", "r", "--no-pdf"], here, capsys,
            "methods.adamerging learns from unlabeled data", "models[1] (task-b)")
    missing = [*doc["models"][:2], {**doc["models"][2], "model": "examples/merge/task-z"}]
    refused(["run", scenario(here, models=missing), "--out", "r", "--no-pdf"], here, capsys,
            "models[2].model", "no such model folder")
    dense = [{**doc["models"][0], "density": 1.5}, *doc["models"][1:]]
    refused(["run", scenario(here, models=dense), "--out", "r", "--no-pdf"], here, capsys, "density", "1")
    unmeasured = [{k: v for k, v in m.items() if k != "evaluation"} for m in doc["models"]]
    refused(["run", scenario(here, models=unmeasured), "--out", "r", "--no-pdf"], here, capsys,
            "models[2].trigger", "evaluation")
    other_base = [*doc["models"][:2], {**doc["models"][2], "model": "examples/merge/llama-a"}]
    refused(["-q", "run", scenario(here, models=other_base), "--out", "r", "--no-pdf"], here, capsys,
            "task model examples/merge/llama-a is a llama model", "share the base model's architecture")
    backdoor = {"kind": "merge-backdoor", "name": "folders", "request": {"what": "x"},
                "model": {"name": "all-minilm-l6-v2", "modality": "text"},
                "tasks": {"names": ["examples/merge/task-a", "examples/merge/task-b"]}, "methods": {"dam": None}}
    (here / "b.yaml").write_text(yaml.safe_dump(backdoor))
    refused(["run", "b.yaml", "--out", "r", "--no-pdf"], here, capsys, "is a model folder", "kind: merge")
