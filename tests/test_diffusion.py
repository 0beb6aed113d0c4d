"""SalUn for diffusion on tiny diffusers UNets: saliency against autograd, masked edits, sampling, metrics, and a
whole `kind: generation` scenario with its sample grid and record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from tiny_generation import SCENARIO, tiny_unet

from safeedit.errors import SafeEditError
from safeedit.eval.generation import frechet_distance, generate, judge_outputs
from safeedit.models.diffusion import DiffusionModel, default_scheduler, diffusion_loss, load_diffusion
from safeedit.report import verify_run, write_report
from safeedit.runners import run_scenario
from safeedit.scenario import load_scenario
from safeedit.unlearn.diffusion import (
    DiffusionUnlearnOptions,
    diffusion_saliency_scores,
    salun_diffusion,
)


@pytest.fixture
def tiny_model() -> DiffusionModel:
    return DiffusionModel(tiny_unet(), default_scheduler(), num_classes=10)


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1, torch.randint(0, 10, (n,), generator=generator)


def test_diffusion_saliency_equals_direct_autograd(tiny_model):
    batches = [images(6, seed) for seed in range(3)]
    scores = diffusion_saliency_scores(tiny_model, batches, torch.Generator().manual_seed(7))

    unet = tiny_model.unet
    unet.zero_grad()
    generator = torch.Generator().manual_seed(7)
    for x, y in batches:
        diffusion_loss(tiny_model, unet, x, y, generator).backward()
    expected = {name: p.grad.abs() for name, p in unet.named_parameters()}
    assert set(scores) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(scores[name], value, rtol=1e-5, atol=1e-8, msg=name)
    assert sum(float(s.sum()) for s in scores.values()) > 0


def test_salun_changes_only_masked_weights_and_keeps_the_original(tiny_model):
    before = {name: p.detach().clone() for name, p in tiny_model.unet.named_parameters()}
    forget, retain = images(16, 1), images(32, 2)
    forget = (forget[0], torch.full_like(forget[1], 3))
    options = DiffusionUnlearnOptions(ratio=0.3, epochs=2, lr=1e-2, batch_size=8, score_batches=2)
    edited, mask = salun_diffusion(tiny_model, forget, retain, options, seed=0, progress=False)
    assert mask is not None and mask.selected == round(0.3 * mask.total)
    changed_inside = 0
    for name, p in edited.unet.named_parameters():
        assert torch.equal(p[~mask.tensors[name]], before[name][~mask.tensors[name]]), name
        changed_inside += int((p != before[name]).sum())
        assert torch.equal(dict(tiny_model.unet.named_parameters())[name], before[name]), "input model modified"
    assert changed_inside > 0.5 * mask.selected

    unmasked, no_mask = salun_diffusion(tiny_model, forget, retain, options.model_copy(update={"ratio": None}),
                                        seed=0, progress=False)
    assert no_mask is None
    changed = sum(int((p != before[n]).sum()) for n, p in unmasked.unet.named_parameters())
    assert changed > mask.selected


def test_sampling_is_seeded_and_in_pixel_range(tiny_model):
    labels = torch.tensor([0, 3, 3, 9])
    first = generate(tiny_model, labels, steps=3, seed=5)
    assert first.shape == (4, 1, 8, 8) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, generate(tiny_model, labels, steps=3, seed=5))
    assert not torch.equal(first, generate(tiny_model, labels, steps=3, seed=6))
    plain = DiffusionModel(tiny_unet(null_class=False), default_scheduler(), 10)
    assert plain.null_class is None and generate(plain, labels, steps=2).shape == (4, 1, 8, 8)


def test_frechet_distance_against_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 3))
    b = rng.normal(0, 2, (4000, 3)) + np.array([1.0, 0, 0])
    # N(0, I) vs N(μ, 4I): |μ|² + Σ (1 + 4 − 2·2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(SafeEditError, match="at least 2 samples"):
        frechet_distance(a[:1], b)


def test_judge_outputs_take_penultimate_features():
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = judge

        def forward(self, pixel_values):
            return self.net(pixel_values)

    pixels = torch.rand(7, 1, 8, 8)
    predicted, features = judge_outputs(Wrapper(), pixels, batch_size=3)
    assert features.shape == (7, 5)
    torch.testing.assert_close(features.float(), judge[:3](pixels))
    assert torch.equal(predicted, judge(pixels).argmax(-1))


@pytest.fixture(scope="module")
def tiny_unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-unet")
    tiny_unet().save_pretrained(folder, safe_serialization=True)
    default_scheduler().save_pretrained(folder / "scheduler")
    return folder


def test_load_diffusion_reads_a_diffusers_folder_and_refuses_others(tiny_unet_folder, tmp_path):
    loaded = load_diffusion(str(tiny_unet_folder), num_classes=10)
    assert loaded.model.null_class == 10 and loaded.model.image_shape == (1, 8, 8)
    with pytest.raises(SafeEditError, match="nor a diffusers UNet folder"):
        load_diffusion(str(tmp_path))
    with pytest.raises(SafeEditError, match="fits neither 4 classes"):
        load_diffusion(str(tiny_unet_folder), num_classes=4)


@pytest.fixture(scope="module")
def generation_run(tiny_unet_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation-run")
    scenario = {**SCENARIO, "model": {"name": str(tiny_unet_folder)}}
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        record_path = run_scenario(path, folder / "out", progress=False)
    return record_path


def test_generation_scenario_writes_grid_masks_and_record(generation_run, tiny_unet_folder):
    record = json.loads(generation_run.read_text())
    out = generation_run.parent
    assert record["kind"] == "generation-unlearning"
    assert set(record["results"]) == {"original", "retrain", "salun", "unmasked"}
    assert record["model"]["judge_test_accuracy"] > 0.9
    for name in ("salun", "unmasked"):
        after = record["results"][name]["metrics"]["after"]
        for key in ("forgetting_accuracy", "retain_accuracy", "frechet_distance", "time_vs_retrain"):
            assert key in after, (name, key)
        assert 0 <= after["forgetting_accuracy"] <= 1 and after["frechet_distance"] >= 0
    salun = record["results"]["salun"]
    assert salun["weight_changes"]["changed_outside_mask"] == 0
    assert record["results"]["unmasked"]["mask"] is None
    roles = {entry["path"]: entry["role"] for entry in record["outputs"]}
    assert roles["samples.png"] == "sample grid" and roles["salun.mask.safetensors"] == "mask"
    assert roles["salun"] == "edited model folder" and roles["retrain"] == "reference model folder"
    from diffusers import UNet2DModel  # the UNet folder loads as is, its noise schedule beside it

    unet = UNet2DModel.from_pretrained(out / "salun", use_safetensors=True)
    source = UNet2DModel.from_pretrained(tiny_unet_folder).config
    assert {k: v for k, v in unet.config.items() if not k.startswith("_")} == {
        k: v for k, v in source.items() if not k.startswith("_")}
    assert (out / "salun" / "scheduler_config.json").is_file()
    png = (out / "samples.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert verify_run(out).ok


def test_generation_report_renders_with_the_sample_grid(generation_run):
    files = write_report(generation_run, pdf=False)
    html = files.html.read_text()
    assert "Removal of a class from an image generator" in html
    assert "Forgetting accuracy" in html and 'alt="generated samples"' in html


def test_generation_scenario_schema_is_strict(tmp_path):
    bad = {**SCENARIO, "model": {"name": "digits-ddpm"}, "methods": {"salun": {"ratio": 0.5, "lr": 1e-3, "eta": 1}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SafeEditError, match=r"methods\.salun: eta: Extra inputs"):
        load_scenario(path)
    path.write_text(yaml.safe_dump({**bad, "methods": {"esd": {}}}))
    with pytest.raises(SafeEditError, match="unknown method 'esd'; choose from salun, unmasked"):
        load_scenario(path)
    path.write_text(yaml.safe_dump({**bad, "kind": "painting"}))
    with pytest.raises(SafeEditError, match="unknown kind 'painting'"):
        load_scenario(path)
