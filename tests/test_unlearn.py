"""The unlearning harness: each objective moves what it should, masks confine SalUn, retrain forgets by design."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from safeedit.data import load_data, make_loader
from safeedit.data.forget import ForgetRequest, split_forget
from safeedit.errors import SafeEditError
from safeedit.eval.classification import classification_metrics
from safeedit.methods import methods
from safeedit.models import load_model
from safeedit.unlearn.methods import RetrainOptions, UnlearnTask, retrain
from safeedit.unlearn.salun import SalUnOptions, salun

METHODS = methods("classification")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> UnlearnTask:
    """The embedded digits CNN with the digit 3 to forget; retain trimmed to 400 images for speed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        model = load_model("digits-cnn", progress=False).model
    split = split_forget(load_data("digits:train"), ForgetRequest(kind="class", label=3))
    from safeedit.models.zoo import EMBEDDED_MODELS

    return UnlearnTask(
        model=model, forget=split.forget, retain=split.retain.select(range(400)), num_classes=10,
        loader=lambda data, batch_size, shuffle=False, seed=0: make_loader(data, model, None, batch_size,
                                                                          shuffle=shuffle, seed=seed),
        build_fresh=EMBEDDED_MODELS["digits-cnn"].build, seed=0, progress=False,
    )


def metrics(task: UnlearnTask, model) -> dict[str, float]:
    test = load_data("digits:test")
    loader = lambda data: make_loader(data, model, None, 256)  # noqa: E731
    return classification_metrics(model, loader(task.forget), loader(task.retain), loader(test))


def mean_loss(model, loader) -> float:
    with torch.no_grad():
        return float(torch.stack([F.cross_entropy(model(**{k: b[k] for k in ("pixel_values",)}).logits, b["label"])
                                  for b in loader]).mean())


def weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_original_remembers_the_forget_class(task):
    assert metrics(task, task.model)["ua"] < 0.05


@pytest.mark.parametrize("name, options", [
    ("ga", {"epochs": 3, "lr": 0.002}),
    ("rl", {"epochs": 3, "lr": 0.02}),
])
def test_forgetting_objectives_raise_unlearning_accuracy(task, name, options):
    before = task.model.state_dict()
    output = METHODS[name].run(task, METHODS[name].options(**options))
    assert metrics(task, output.model)["ua"] > 0.3
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())  # input untouched


def test_fine_tune_repairs_retain_loss_after_damage(task):
    """Start from a model gradient ascent damaged; fine-tuning on retain must bring the retain loss back down.

    Thresholds by meaning, not by one machine's numbers: the damage is real (retain loss at least 10× the
    original's; measured ~400×) and fine-tuning undoes most of it (at least 4× lower again; measured ~7× under the
    AVX-512, AVX2 and default kernel sets alike)."""
    damaged = METHODS["ga"].run(task, METHODS["ga"].options(epochs=3, lr=0.01)).model
    retain = make_loader(task.retain, task.model, None, 256)
    repaired = METHODS["ft"].run(dataclasses.replace(task, model=damaged), METHODS["ft"].options(epochs=3)).model
    assert mean_loss(damaged, retain) > 10 * mean_loss(task.model, retain)
    assert mean_loss(repaired, retain) < mean_loss(damaged, retain) / 4
    assert metrics(task, repaired)["ra"] > metrics(task, damaged)["ra"]


def test_l1_sparse_shrinks_the_weights_more_than_fine_tuning(task):
    options = {"epochs": 2, "lr": 0.01}
    ft = METHODS["ft"].run(task, METHODS["ft"].options(**options)).model
    l1 = METHODS["l1_sparse"].run(task, METHODS["l1_sparse"].options(alpha=5e-3, **options)).model
    l1_norm = lambda m: sum(p.abs().sum() for p in m.parameters())  # noqa: E731
    assert l1_norm(l1) < l1_norm(ft)


def test_salun_changes_only_masked_weights_and_forgets(task):
    forget = task.loader(task.forget, 64, True, 0)
    retain = task.loader(task.retain, 64, True, 1)
    edited, mask = salun(task.model, forget, retain, 10, SalUnOptions(ratio=0.3, epochs=4, lr=0.02), progress=False)
    original = dict(task.model.named_parameters())
    changed_inside = 0
    for name, param in edited.named_parameters():
        keep = mask.tensors[name]
        assert torch.equal(param[~keep], original[name][~keep]), name  # bit-identical outside the mask
        changed_inside += int((param[keep] != original[name][keep]).sum())
    assert changed_inside > 0.5 * mask.selected
    assert mask.selected == round(0.3 * mask.total) or abs(mask.selected - 0.3 * mask.total) <= 0.5
    assert metrics(task, edited)["ua"] > 0.3


def test_any_objective_takes_a_mask_from_any_score(task):
    output = METHODS["ft"].run(task, METHODS["ft"].options(epochs=1, mask_score="random", ratio=0.1))
    assert output.mask is not None and output.mask.metadata["score"] == "random"
    for name, param in output.model.named_parameters():
        keep = output.mask.tensors[name]
        assert torch.equal(param[~keep], dict(task.model.named_parameters())[name][~keep])


def test_runs_repeat_exactly_with_the_same_seed(task):
    options = METHODS["salun"].options(epochs=1, ratio=0.5)
    first = METHODS["salun"].run(task, options).model
    second = METHODS["salun"].run(task, options).model
    assert weights_equal(first, second)


def test_retrain_never_sees_the_forget_class(task):
    reference = retrain(task, RetrainOptions(epochs=8), {"lr": 2e-3, "batch_size": 64}).model
    assert metrics(task, reference)["ua"] > 0.95


def test_forget_requests_are_checked():
    train = load_data("digits:train")
    with pytest.raises(SafeEditError, match="selects no example"):
        split_forget(train, ForgetRequest(kind="class", label=42))
    with pytest.raises(SafeEditError, match="not in the training data"):
        split_forget(train, ForgetRequest(kind="ids", ids=[10**9]))
    split = split_forget(train, ForgetRequest(kind="random", fraction=0.1, seed=3))
    assert len(split.forget) == round(0.1 * len(train))
    assert not set(split.forget["id"]) & set(split.retain["id"])
    again = split_forget(train, ForgetRequest(kind="random", fraction=0.1, seed=3))
    assert again.fingerprints() == split.fingerprints()
    with pytest.raises(ValueError, match="needs 'label'"):
        ForgetRequest(kind="class")
