"""The flat metrics the LLM attack surface (`safeedit.robustness.language`) adds to a result, by protocol: what
a scenario's criteria may name, checked before any model loads (kept apart from the surface, which needs the data
modules, so that `safeedit.scenario` can read them)."""

from __future__ import annotations

from typing import Literal

from safeedit.robustness.battery import RobustnessOptions, robustness_metric_names

Protocol = Literal["fictitious-authors", "capitals", "files"]
PROBES = ("plain", "reworded", "french", "mc", "fill_in", "fewshot")


def measured_metric_names(protocol: Protocol, perturbed: bool, reference: bool) -> list[str]:
    """What the surface's `measure` returns, its primary metric first."""
    if protocol == "capitals":
        return ["forget_accuracy", "probability_forget", "probability_retain"]
    return ["probability_forget", *(["truth_ratio_forget"] if perturbed else []),
            *(["forget_quality"] if perturbed and reference else []), "probability_retain"]


def probe_names(protocol: Protocol, perturbed: bool) -> dict[str, str | None]:
    """Probe -> its flat metric (None: not available for this protocol)."""
    if protocol == "files":
        return {"plain": "probability_forget_plain", "reworded": None, "french": None,
                "mc": "forget_accuracy_mc" if perturbed else None, "fill_in": None,
                "fewshot": "probability_forget_fewshot"}
    return {probe: f"forget_accuracy_{probe}" for probe in PROBES}


def language_metric_names(protocol: Protocol, perturbed: bool, reference: bool,
                          options: RobustnessOptions) -> set[str]:
    """Every flat metric the battery adds to an LLM result: for checking a scenario's criteria before the run."""
    sets = ["forget", "related"] if options.related else ["forget"]
    probes = [name for name in probe_names(protocol, perturbed).values() if name]
    return robustness_metric_names(measured_metric_names(protocol, perturbed, reference), options, sets, probes)
