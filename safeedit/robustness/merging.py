"""The merges' attack surface (`kind: merge-backdoor`, `kind: merge`): does a merge stay free of the backdoor that
one of its task models carried, once someone fine-tunes, quantizes or merges it again?

A merge is attacked as one model, `MergedTasks`: the merged body shared by every task and each task's own head.

- relearning (`safeedit.robustness.relearn`): the attacker fine-tunes the whole merged model on a few poisoned
  examples of each backdoored task (the trigger and the target label) shuffled among as many clean ones of it
  (`forget`: the backdoor planted again, as it was first planted), or on the clean ones alone (`related`: the
  same fine-tune without the poison);
- quantization: the battery's int8 / int4 round-to-nearest of every linear layer of the body and the heads;
- `remerge` (this kind's own): the merge is merged once more with the backdoored task models' task vectors by
  task arithmetic with the run's coefficients, θ' = θ + λ wᵦ τᵦ (`safeedit.merge.baselines`): what a user who
  merges the cleaned model with a model it already contains gets. Its figures are `remerge_<metric>`.

Measured as the run measures (`safeedit.eval.merging`): `backdoor_asr` (the primary metric, low = forgotten: the
mean ASR on the backdoored tasks) and `avg_accuracy`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets
from pydantic import BaseModel
from torch import nn
from torch.func import functional_call

from safeedit.attacks.backdoor import TriggerSpec, triggered_test_set
from safeedit.batches import to_device
from safeedit.merge.baselines import task_arithmetic_coefficients
from safeedit.merge.setting import MergeSetting
from safeedit.merge.vectors import Vector, merged_parameters, with_parameters
from safeedit.methods import get_method
from safeedit.robustness.battery import AttackSurface, RobustnessOptions
from safeedit.robustness.relearn import RelearnSet

# The attacker's default AdamW lr and batch. The lr is a gentle fine-tune, chosen on the development seed 0 of
# scenarios/merge-vision-backdoor.yaml so that the curve can tell a merge that kept the backdoor from one that lost
# it: there, a model that never had the backdoor (the frozen encoder) stays below 15% ASR after 10 steps and keeps
# its accuracy, while the task-arithmetic merge is back above 90%. At the task models' own fine-tuning lr (5e-4)
# a dozen examples overfit within 10 steps, and every model, the frozen encoder included, ends near 100% ASR with
# its accuracy gone. The relearning benchmark reports seeds 1, 2, 3 (benchmarks/dam.py --robustness).
DEFAULT_LR, DEFAULT_BATCH = 1e-5, 8
# What the battery measures of a merge: the run's backdoor ASR and average accuracy, so that the attacked figures
# are a few flat metrics per result (relearn_backdoor_asr@10, avg_accuracy_int4, ...). The transfer ASR (the
# trigger on the other tasks) is left out: it would triple the triggered examples run at every measurement.
MEASURED = ("backdoor_asr", "avg_accuracy")


def backdoored_only(triggered: Mapping[tuple[str, str], Dataset], backdoored: Iterable[str]
                    ) -> dict[tuple[str, str], Dataset]:
    """The triggered test sets (trigger's task, task) the backdoor ASR reads: those of the backdoored tasks."""
    tasks = set(backdoored)
    return {key: rows for key, rows in triggered.items() if key[1] in tasks}
Loader = Callable[[Dataset, int, bool, int], Iterable[dict]]  # (rows, batch size, shuffle, seed) -> batches


class MergedTasks(nn.Module):
    """Every task's classifier under one merge, called as `model(task, batch)` -> logits.

    `body` holds the merged parameters under the base's names. Without `renames`, each head is a module on the
    body's features (`merge-backdoor`: the body is an encoder, the heads linear). With `renames` (`kind: merge`),
    each head is a whole task classifier whose merged parameters are replaced by the body's through
    `functional_call` (`renames[task]`: merged name -> its name in that classifier), as `ClassifierSetting` does.
    """

    def __init__(self, body: nn.Module, heads: Mapping[str, nn.Module],
                 renames: Mapping[str, Mapping[str, str]] | None = None) -> None:
        super().__init__()
        self.body, self.tasks = body, list(heads)
        self.heads = nn.ModuleList(heads.values())  # a list: task names may hold '.' (folders), ModuleDict keys not
        self.renames = {task: dict(renames[task]) for task in self.tasks} if renames is not None else None

    def forward(self, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        head = self.heads[self.tasks.index(task)]
        if self.renames is None:
            return head(self.body(batch))
        own = dict(self.body.named_parameters())
        return functional_call(head, {name: own[merged] for merged, name in self.renames[task].items()}, (batch,),
                               strict=False)

    def body_parameters(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        own = dict(self.body.named_parameters())
        return {name: own[name].detach() for name in names}

    def with_body(self, parameters: Mapping[str, torch.Tensor]) -> MergedTasks:
        """A model whose body is a copy carrying `parameters` (the heads are shared, not copied: for measuring)."""
        return MergedTasks(with_parameters(self.body, parameters), dict(zip(self.tasks, self.heads, strict=True)),
                           self.renames)

    def views(self) -> dict[str, nn.Module]:
        """Each task's model as the runners' evaluation calls it (`model(batch)`)."""
        return {task: _TaskView(self, task) for task in self.tasks}


class _TaskView(nn.Module):
    def __init__(self, merged: MergedTasks, task: str) -> None:
        super().__init__()
        self.merged, self.task = merged, task

    def forward(self, batch: Mapping[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        return self.merged(self.task, batch)


def attacked(scenario: Any, name: str) -> bool:
    """Whether the scenario's battery attacks result `name` (the runners build no model for it otherwise)."""
    options = getattr(scenario, "robustness", None)
    return options is not None and options.attacks(name)


def held_count(total: int, share: float) -> int:
    """How many of `total` examples a `share` is (at least one)."""
    return max(1, round(share * total))


def sample_rows(rows: Dataset, count: int, seed: int, among: np.ndarray | None = None) -> tuple[Dataset, Dataset]:
    """`count` rows drawn with `seed` among the row numbers `among` (default: all), in their order; and every
    other row."""
    candidates = np.arange(len(rows)) if among is None else np.asarray(among)
    chosen = np.sort(np.random.default_rng(seed).permutation(candidates)[:count])
    return rows.select(chosen), rows.select(np.setdiff1d(np.arange(len(rows)), chosen))


def poisoned_copies(rows: Dataset, spec: TriggerSpec, seed: int) -> Dataset:
    """The rows outside the target class with the trigger and the target label (what the backdoor was planted
    with: `safeedit.attacks.backdoor`)."""
    triggered = triggered_test_set(rows, spec, seed)
    return triggered.map(lambda _: {"label": spec.target})


def task_arithmetic_options(scenario: Any) -> BaseModel:
    """The scenario's task-arithmetic options (its `methods.task_arithmetic`, else the method's defaults)."""
    spec = get_method("merge", "task_arithmetic")
    return scenario.method_options().get("task_arithmetic") or spec.options()


def task_arithmetic_merge(setting: MergeSetting, options: BaseModel, seed: int) -> dict[str, torch.Tensor]:
    """The run's task-arithmetic merge (the registered method, so its weights and normalization are the run's)."""
    return get_method("merge", "task_arithmetic").run(setting, options, seed, False).parameters


@dataclass
class Remerge:
    """Merging the cleaned model again with the backdoored task vectors: τᵦ = θᵦ − θ₀ (the setting's) and the
    coefficient each had in the run's task arithmetic."""

    vectors: Mapping[str, Vector]
    coefficients: Mapping[str, float]

    @classmethod
    def of_run(cls, setting: MergeSetting, backdoored: Sequence[str], options: BaseModel) -> Remerge:
        """`options`: the run's task-arithmetic options (scale λ, normalize) with the setting's per-task weights."""
        coefficients = task_arithmetic_coefficients(setting.tasks, options.scale, setting.weights, options.normalize)
        return cls({task: setting.vectors[task] for task in backdoored},
                   {task: coefficients[task] for task in backdoored})

    def __call__(self, model: MergedTasks) -> MergedTasks:
        names = next(iter(self.vectors.values())).keys()
        return model.with_body(merged_parameters(model.body_parameters(names), self.vectors, self.coefficients))

    def describe(self) -> str:
        terms = " + ".join(f"{coefficient:g}·τ({task})" for task, coefficient in self.coefficients.items())
        return (f"the model merged again by task arithmetic with the backdoored task model's task vector, "
                f"θ + {terms}, the coefficient it had in the run's task-arithmetic merge; then measured as the run")


def merged_loss(model: MergedTasks, item: tuple[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Cross-entropy of the task's head on a labelled batch (`item`: task, batch)."""
    task, batch = item
    device = next(model.parameters()).device
    inputs = to_device({key: value for key, value in batch.items() if key != "label"}, device)
    return F.cross_entropy(model(task, inputs), batch["label"].to(device))


def _interleaved(sets: Mapping[str, Dataset], loader: Loader, batch_size: int, seed: int
                 ) -> Callable[[], Iterator[tuple[str, dict]]]:
    """A fresh iterator over every task's batches, taking one batch of each task in turn."""

    def batches() -> Iterator[tuple[str, dict]]:
        streams = {task: list(loader(rows, batch_size, True, seed)) for task, rows in sets.items()}
        for group in itertools.zip_longest(*streams.values()):
            yield from ((task, batch) for task, batch in zip(streams, group, strict=True) if batch is not None)

    return batches


def merge_surface(measure: Callable[[Mapping[str, nn.Module]], Mapping[str, float | None]],
                  poisoned: Mapping[str, Dataset], clean: Mapping[str, Dataset], loader: Loader,
                  options: RobustnessOptions, seed: int, remerge: Remerge | None, about: str) -> AttackSurface:
    """The surface of a merge. `measure(task models)` is the runner's evaluation on data the attacker does not
    hold; `poisoned` / `clean`: per backdoored task, the poisoned and the clean examples the attacker holds.
    Relearning on `forget` trains on both, shuffled together (as the backdoor was planted: poison among clean
    data, so the trigger, not the target class alone, is what is learned); on `related`, on the clean ones alone,
    so the two curves differ by the poison only. `loader(rows, batch size, shuffle, seed)` collates as the runner
    does."""
    backdoored = list(poisoned)
    forget = {task: concatenate_datasets([poisoned[task], clean[task]]) for task in backdoored}

    def measured(model: MergedTasks) -> dict[str, float]:
        return {key: value for key, value in measure(model.views()).items() if key in MEASURED and value is not None}

    batch = options.batch_size or DEFAULT_BATCH
    count = lambda sets: sum(len(rows) for rows in sets.values())  # noqa: E731
    tasks = ", ".join(backdoored)
    relearn = {
        "forget": RelearnSet(f"{count(poisoned)} poisoned examples of {tasks} (trigger, target label) among "
                             f"{count(clean)} clean ones", count(forget), _interleaved(forget, loader, batch, seed)),
        "related": RelearnSet(f"the {count(clean)} clean examples of {tasks} alone (no trigger)", count(clean),
                              _interleaved(clean, loader, batch, seed)),
    }
    attacks = {}
    if remerge is not None:
        def remerged(model: MergedTasks) -> dict[str, Any]:
            metrics = measured(remerge(model))
            return {"metrics": {f"remerge_{key}": value for key, value in metrics.items()},
                    "about": remerge.describe(), "coefficients": dict(remerge.coefficients)}

        attacks["remerge"] = remerged
    return AttackSurface(measure=measured, primary="backdoor_asr", forgotten="low", relearn=relearn,
                         loss=merged_loss, lr=DEFAULT_LR, attacks=attacks, about=f"{about}; batch {batch}")


class MergeBattery:
    """What both merge jobs share for the battery (mixed into `MergeJob` and `ModelMergeJob` before `Job`). The job
    supplies `merged_tasks(parameters)` (its tasks' models under a merge), `merge_setting`, `encoder` (collates)
    and `scenario`."""

    scenario: Any
    merge_setting: MergeSetting
    encoder: Any
    _task_arithmetic: MergedTasks | None = None

    def merged_tasks(self, parameters: Mapping[str, torch.Tensor]) -> MergedTasks:
        raise NotImplementedError

    def attacked_model(self, name: str, result: Any) -> MergedTasks | None:
        """The merge as one model; `individual` merges nothing (separate task models) and is not attacked."""
        if result.parameters is None or not attacked(self.scenario, name):
            return None
        return self.unedited if name == "task_arithmetic" else self.merged_tasks(result.parameters)

    @property
    def unedited(self) -> MergedTasks:
        """The run's task-arithmetic merge: what the other merges change, so the quantization diagnostic
        (`edit_below_half_step_*`) says how much of a defence's change to the plain merge survives rounding."""
        if self._task_arithmetic is None:
            options = task_arithmetic_options(self.scenario)
            self._task_arithmetic = self.merged_tasks(task_arithmetic_merge(self.merge_setting, options,
                                                                            self.scenario.seed))
        return self._task_arithmetic

    def battery_surface(self, measure: Callable[[Mapping[str, nn.Module]], Mapping[str, float | None]],
                        poisoned: Mapping[str, Dataset], clean: Mapping[str, Dataset], about: str) -> AttackSurface:
        """`merge_surface` with the job's collation, budget, seed and the remerge of its backdoored tasks."""
        from safeedit.models.encoders import loader

        remerge = Remerge.of_run(self.merge_setting, list(poisoned), task_arithmetic_options(self.scenario))
        return merge_surface(measure, poisoned, clean,
                             lambda rows, size, shuffle, seed: loader(self.encoder, rows, size, shuffle, seed),
                             self.scenario.robustness, self.scenario.seed, remerge, about)
