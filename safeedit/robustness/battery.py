"""The robustness battery: every result of a run (original, reference, each method) attacked the same way, with
the figures in its record entry (`robustness`) and, flattened, among its metrics so criteria can name them:

    relearn_<metric>@<k>            after k steps of fine-tuning on a share of the forget data
    relearn_<set>_<metric>@<k>      after k steps on another set the kind offers (e.g. `related`: never forgotten)
    <metric>_<scheme>               after rounding the weights to int8 / int4 (`safeedit.robustness.quantize`)
    edit_below_half_step_<scheme>   share of edited weights that changed by less than half a step of their group
    <attack metrics>                what a kind's own attacks measure (probes, repair, merging again)

A kind says what is attacked and how it is measured in an `AttackSurface`; the battery is the same for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from safeedit.config import Strict
from safeedit.progress import say
from safeedit.robustness.quantize import SCHEMES, Scheme, quantize_model, revival
from safeedit.robustness.relearn import RelearnSet, relearn_curve


class RobustnessOptions(Strict):
    """A scenario's `robustness:` section: the battery's budget (the same for every result)."""

    relearn_steps: list[int] = Field(default=[0, 10, 50], description="fine-tuning steps at which forgetting is "
                                     "measured again (0: the model as edited)")
    lr: float | None = Field(default=None, gt=0, description="the attacker's AdamW learning rate (default: the "
                             "kind's)")
    batch_size: int | None = Field(default=None, ge=1, description="the attacker's batch size (default: the kind's)")
    forget_share: float = Field(default=0.1, gt=0, le=1, description="share of the forget data the attacker holds; "
                                "forgetting is measured on the rest")
    related: bool = Field(default=True, description="also relearn on related data that was never forgotten")
    quantize: list[Literal["int8", "int4"]] = Field(default=list(SCHEMES), description="weight-only schemes")
    group_size: int = Field(default=128, ge=1, description="inputs per int4 group")
    results: list[str] | None = Field(default=None, description="results to attack (default: every one)")

    @field_validator("relearn_steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if not steps or any(s < 0 for s in steps):
            raise ValueError("relearn_steps: give step counts of 0 or more, e.g. [0, 10, 50]")
        return sorted(set(steps))

    def attacks(self, name: str) -> bool:
        return self.results is None or name in self.results


@dataclass
class AttackSurface:
    """What a kind hands the battery.

    `measure(model)` returns the kind's forgetting and utility metrics (record names) on the data kept for
    measuring (forget data the attacker does not hold); `primary` is the forgetting metric the report's curves
    show, `forgotten` whether a `high` or `low` value of it means forgotten. `relearn` holds the attacker's
    data sets (`forget`: a share of the forget data; others, such as `related`) and `loss(model, batch)` their
    training loss, at learning rate `lr`. `attacks` are the kind's own attacks: name -> function of a model
    returning ``{"metrics": {...}, ...details}``. `network(model)` is the `nn.Module` inside a kind's wrapper.
    """

    measure: Callable[[Any], dict[str, float]]
    primary: str
    forgotten: Literal["high", "low"]
    relearn: dict[str, RelearnSet]
    loss: Callable[[Any, Any], Any]
    lr: float
    attacks: dict[str, Callable[[Any], dict[str, Any]]] = field(default_factory=dict)
    network: Callable[[Any], nn.Module] = lambda model: model
    about: str = ""


def relearn_metric(relearn_set: str, metric: str, steps: int) -> str:
    return f"relearn_{metric}@{steps}" if relearn_set == "forget" else f"relearn_{relearn_set}_{metric}@{steps}"


def robustness_metric_names(metrics: Sequence[str], options: RobustnessOptions, relearn_sets: Sequence[str],
                            attack_metrics: Sequence[str] = ()) -> set[str]:
    """Every flat metric name the battery adds, for checking a scenario's criteria before the run."""
    names = {relearn_metric(s, m, k) for s in relearn_sets for m in metrics for k in options.relearn_steps}
    names |= {f"{m}_{scheme}" for m in metrics for scheme in options.quantize}
    names |= {f"edit_below_half_step_{scheme}" for scheme in options.quantize}
    return names | set(attack_metrics)


def attack(surface: AttackSurface, name: str, model: Any, original: Any | None, options: RobustnessOptions,
           seed: int, progress: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the battery on result `name`: the flat metrics it adds and its record entry (`robustness`)."""
    started = time.perf_counter()
    flat: dict[str, float] = {}
    entry: dict[str, Any] = {"relearning": {}, "quantization": {}, "attacks": {}}
    lr = options.lr or surface.lr
    at_start: dict[str, float] | None = None  # step 0 is the model as edited: measured once for every set
    for set_name, data in surface.relearn.items():
        if set_name != "forget" and not options.related:
            continue
        say(f"robustness: {name}: relearning on {data.about} ({max(options.relearn_steps)} steps)", progress)
        curve = relearn_curve(model, data, surface.loss, surface.measure, options.relearn_steps, lr, seed,
                              surface.network, at_start)
        if 0 in curve["steps"]:
            at_start = {metric: values[0] for metric, values in curve["metrics"].items()}
        entry["relearning"][set_name] = {"about": data.about, "examples": data.examples, **curve}
        for metric, values in curve["metrics"].items():
            flat.update({relearn_metric(set_name, metric, k): v for k, v in zip(curve["steps"], values, strict=True)})
    for scheme_name in options.quantize:
        scheme = Scheme.named(scheme_name, options.group_size)
        say(f"robustness: {name}: {scheme.describe()}", progress)
        quantized = quantize_model(model, scheme, surface.network)
        measured = surface.measure(quantized)
        del quantized
        item: dict[str, Any] = {"scheme": scheme.describe(), "metrics": measured}
        flat.update({f"{metric}_{scheme_name}": value for metric, value in measured.items()})
        if original is not None and original is not model:
            item["revival"] = revival(surface.network(original), surface.network(model), scheme)
            flat[f"edit_below_half_step_{scheme_name}"] = item["revival"]["share_below_half_step"]
        entry["quantization"][scheme_name] = item
    for attack_name, run_attack in surface.attacks.items():
        say(f"robustness: {name}: {attack_name}", progress)
        outcome = run_attack(model)
        flat.update(outcome.get("metrics", {}))
        entry["attacks"][attack_name] = outcome
    entry["budget"] = {"relearn_steps": options.relearn_steps, "lr": lr, "optimizer": "AdamW (weight decay 0)",
                       "seed": seed, "forget_share": options.forget_share, "primary": surface.primary,
                       "forgotten": surface.forgotten, "about": surface.about}
    entry["wall_time_s"] = time.perf_counter() - started
    return flat, entry
