"""The generator's attack surface on a tiny diffusers UNet: what is measured (the judge's verdicts on a fixed
sample), what the attacker holds (a share of the forgotten class's training images, test images of the class),
the relearning loss, the battery's figures and their determinism, and a `kind: generation` scenario attacked."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from datasets import Dataset
from tiny_generation import SCENARIO, tiny_unet
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.models.diffusion import DiffusionModel, default_scheduler, diffusion_loss, image_tensors
from safeedit.report import verify_run
from safeedit.robustness import RobustnessOptions, attack, relearn_curve
from safeedit.robustness.generation import DEFAULT_LR, generation_surface, relearn_loss
from safeedit.runners import run_scenario

FORGET = 3
TEST_LABELS = [0, FORGET, 1, 2, FORGET, 4, 5, FORGET, 6, 7, 8, 9]


class Judge(nn.Module):
    """A classifier on pixels: a linear layer (its input is the penultimate feature), counting what it judges."""

    def __init__(self, constant: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.head = nn.Linear(64, 10)
        if constant is not None:  # always the class `constant`
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(constant), 10).float())
        self.judged = 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.judged += len(pixel_values)
        return self.head(pixel_values.flatten(1))


def forget_images(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1, torch.full((n,), FORGET)


def digits_test(labels: list[int]) -> Dataset:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand((len(labels), 1, 8, 8), generator=generator)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "label": labels})


@pytest.fixture
def model() -> DiffusionModel:
    return DiffusionModel(tiny_unet(), default_scheduler(), num_classes=10)


def surface(judge: nn.Module, options: RobustnessOptions | None = None, labels: list[int] | None = None, **kw):
    test = digits_test(labels if labels is not None else TEST_LABELS)
    return generation_surface(forget_images(), test, judge, FORGET, 10, options or RobustnessOptions(), seed=0,
                              sampling_steps=kw.pop("sampling_steps", 2), **kw)


def test_measure_is_the_judges_verdicts_on_the_forget_class_and_the_others(model):
    judge = Judge(constant=FORGET)  # calls every sample a 3: nothing forgotten, no other class right
    forgotten = surface(judge, forget_samples=6, retain_samples=2)
    assert forgotten.measure(model) == {"forgetting_accuracy": 0.0, "retain_accuracy": 0.0}
    assert judge.judged == 6 + 9 * 2  # the forget class's samples and two of each other class
    five = surface(Judge(constant=5), forget_samples=6, retain_samples=2)
    assert five.measure(model) == pytest.approx({"forgetting_accuracy": 1.0, "retain_accuracy": 1 / 9})
    assert forgotten.primary == "forgetting_accuracy" and forgotten.forgotten == "high"
    assert "6 samples asked for class 3" in forgotten.about and "2 DDIM steps" in forgotten.about
    assert "25 DDIM steps" in surface(judge, sampling_steps=50).about  # the battery's cap on sampling steps


def test_measure_draws_the_same_noise_every_time(model):
    judge = Judge()
    measure = surface(judge, forget_samples=20, retain_samples=3).measure
    first = measure(model)
    assert measure(model) == first
    with torch.no_grad():  # another model on the same noise: its samples, so its verdicts, differ
        model.unet.conv_out.bias.add_(3.0)
    assert measure(model) != first


def test_the_attacker_holds_a_share_of_the_forget_images_and_unseen_test_images_of_the_class():
    options = RobustnessOptions(forget_share=0.25, batch_size=2)
    attacked = surface(Judge(), options)
    forget, held = attacked.relearn["forget"], forget_images()
    assert forget.examples == 3 and "3 of the 12 training images of class 3 (25%)" in forget.about
    batches = list(forget.batches())
    assert [len(b[0]) for b in batches] == [2, 1]
    images = torch.cat([b[0] for b in batches])
    assert all(any(torch.equal(image, row) for row in held[0]) for image in images)
    assert len({tuple(image.flatten().tolist()) for image in images}) == 3
    related = attacked.relearn["related"]
    test_images, test_labels = image_tensors(digits_test(TEST_LABELS))
    assert related.examples == 3 and "(held out from training)" in related.about
    related_images = torch.cat([b[0] for b in related.batches()])
    assert all((b[1] == FORGET).all() for b in related.batches())
    assert sorted(related_images.flatten(1).tolist()) == sorted(test_images[test_labels == FORGET].flatten(1).tolist())
    assert relearn_loss.__name__ == attacked.loss.__name__ and attacked.lr == DEFAULT_LR


def test_the_relearning_loss_is_the_ddpm_loss_with_seeded_draws(model):
    attacked = surface(Judge(), RobustnessOptions(forget_share=0.5, batch_size=4))
    first, again = list(attacked.relearn["forget"].batches()), list(attacked.relearn["forget"].batches())
    with torch.no_grad():
        losses = [float(relearn_loss(model, b)) for b in first]
        assert losses == [float(relearn_loss(model, b)) for b in again]  # every curve: the same timesteps and noise
        images, labels, _ = first[0]
        expected = diffusion_loss(model, model.unet, images, labels, torch.Generator().manual_seed(0 + 1))
    assert losses[0] == pytest.approx(float(expected))


def test_relearning_trains_the_unet_inside_the_wrapper(model):
    attacked = surface(Judge(), RobustnessOptions(forget_share=0.5, batch_size=6))
    held = attacked.relearn["forget"]
    images, labels, _ = next(held.batches())

    def fixed_loss(m: DiffusionModel) -> dict[str, float]:
        with torch.no_grad():
            return {"loss": float(diffusion_loss(m, m.unet, images, labels, torch.Generator().manual_seed(9)))}

    curve = relearn_curve(model, held, attacked.loss, fixed_loss, [0, 8], 1e-2, 0, attacked.network)
    before, after = curve["metrics"]["loss"]
    assert after < 0.8 * before
    assert fixed_loss(model)["loss"] == pytest.approx(before)  # the attacked model is a copy


def test_the_battery_on_a_generator_names_its_figures_and_repeats_exactly(model):
    edited = DiffusionModel(tiny_unet(), default_scheduler(), 10)
    with torch.no_grad():
        edited.unet.conv_in.weight.add_(0.01)
    attacked = surface(Judge(), RobustnessOptions(), forget_samples=8, retain_samples=1)
    options = RobustnessOptions(relearn_steps=[0, 2], quantize=["int8"], lr=1e-3)
    flat, entry = attack(attacked, "salun", edited, model, options, 0, progress=False)
    assert {"relearn_forgetting_accuracy@2", "relearn_related_retain_accuracy@2", "forgetting_accuracy_int8",
            "retain_accuracy_int8", "edit_below_half_step_int8"} <= set(flat)
    assert flat["relearn_forgetting_accuracy@0"] == attacked.measure(edited)["forgetting_accuracy"]
    assert entry["quantization"]["int8"]["revival"]["edited"] == edited.unet.conv_in.weight.numel()
    assert entry["budget"]["lr"] == 1e-3 and entry["relearning"]["related"]["examples"] == 1
    again, _ = attack(attacked, "salun", edited, model, options, 0, progress=False)
    assert again == flat


def test_a_test_set_without_the_class_leaves_no_related_data():
    with pytest.raises(SafeEditError, match="related: false"):
        surface(Judge(), labels=[0, 1, 2])
    with pytest.raises(SafeEditError, match="forget_samples >= 1"):
        surface(Judge(), forget_samples=0)


def test_a_generation_scenario_attacks_every_result(tmp_path, model):
    folder = tmp_path / "unet"
    model.unet.save_pretrained(folder, safe_serialization=True)
    robustness = {"relearn_steps": [0, 1], "quantize": ["int4"]}
    criteria = ["salun.relearn_forgetting_accuracy@1 >= retrain.relearn_forgetting_accuracy@1 - 100%"]
    scenario = {**SCENARIO, "model": {"name": str(folder)}, "robustness": robustness, "criteria": criteria,
                "methods": {"salun": SCENARIO["methods"]["salun"]}}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEEDIT_CACHE", str(tmp_path / "cache"))
        record_path = run_scenario(path, tmp_path / "out", progress=False)
    record = json.loads(record_path.read_text())
    for name in ("original", "retrain", "salun"):
        result = record["results"][name]
        after = result["metrics"]["after"]
        assert {"relearn_forgetting_accuracy@1", "relearn_related_forgetting_accuracy@1",
                "forgetting_accuracy_int4"} <= set(after), name
        assert result["robustness"]["budget"]["lr"] == DEFAULT_LR
        assert "samples asked for class 3" in result["robustness"]["budget"]["about"]
    assert "edit_below_half_step_int4" in record["results"]["salun"]["metrics"]["after"]
    assert "edit_below_half_step_int4" not in record["results"]["original"]["metrics"]["after"]
    assert "edit_below_half_step_int4" not in record["results"]["retrain"]["metrics"]["after"]  # a reference
    assert record["timings"]["robustness_s"] > 0
    assert record["verdict"]["criteria"][0]["passed"] is True
    assert verify_run(record_path.parent).ok
