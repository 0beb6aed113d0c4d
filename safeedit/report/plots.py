"""The report's figures, drawn with matplotlib from the record alone and returned as inline SVG data URIs
(self-contained, vector, text kept as text). A figure whose data the record lacks is simply absent."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from safeedit.record import plain_label

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "safeedit", "font.size": 8.5,
                     "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100})
COLORS = {"original": "#8c8c8c", "retrain": "#1f6feb"}
PALETTE = ("#d1242f", "#bf8700", "#1a7f37", "#8250df", "#0a7d8c", "#cf222e", "#57606a")
SET_COLORS = {"forget": "#d1242f", "retain": "#1a7f37", "test": "#57606a"}


def _color(name: str, index: int) -> str:
    return COLORS.get(name, PALETTE[index % len(PALETTE)])


def _data_uri(figure: plt.Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue().encode()).decode()


def metric_comparison(results: dict[str, Any], metrics: Sequence[str]) -> str | None:
    """Grouped bars: each fraction metric (rows) for every result (original, reference, methods)."""
    metrics = [m for m in metrics if any(_after(r, m) is not None for r in results.values())
               and all(0 <= (_after(r, m) or 0) <= 1 for r in results.values())]
    if not metrics:
        return None
    names = list(results)
    height = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(7.2, 0.45 + 0.32 * len(metrics) * max(2, len(names)) / 2.4))
    for index, name in enumerate(names):
        values = [_after(results[name], m) for m in metrics]
        positions = np.arange(len(metrics)) + (index - (len(names) - 1) / 2) * height
        axes.barh(positions, [v if v is not None else 0 for v in values], height, label=name,
                  color=_color(name, index))
    axes.set_yticks(np.arange(len(metrics)), [plain_label(m) for m in metrics])
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), frameon=False)
    axes.set_title("Metrics after the edit (the original model and the retrained reference for comparison)",
                   loc="left", fontsize=9)
    return _data_uri(figure)


def mask_density(results: dict[str, Any]) -> str | None:
    """Per layer: share of the tensor's weights the mask lets the method edit."""
    masked = {name: r["mask"] for name, r in results.items() if r.get("mask")}
    if not masked:
        return None
    layers = [layer["name"] for layer in next(iter(masked.values()))["layers"]]
    figure, axes = plt.subplots(figsize=(7.2, 0.6 + 0.2 * len(layers) * max(1, len(masked)) ** 0.5))
    height = 0.8 / len(masked)
    for index, (name, mask) in enumerate(masked.items()):
        density = {layer["name"]: layer["density"] for layer in mask["layers"]}
        positions = np.arange(len(layers)) + (index - (len(masked) - 1) / 2) * height
        axes.barh(positions, [density.get(layer, 0.0) for layer in layers], height,
                  label=f"{name} ({mask['density']:.0%} overall)", color=_color(name, index + 2))
    axes.set_yticks(np.arange(len(layers)), layers, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes.legend(loc="lower right", frameon=False)
    axes.set_title("Mask density per layer: share of each tensor's weights the edit may change", loc="left",
                   fontsize=9)
    return _data_uri(figure)


def confidence_histograms(results: dict[str, Any]) -> str | None:
    """One panel per result: distribution of the true-label confidence on forget, retain and test examples."""
    shown = {n: r["evidence"]["confidence_histogram"] for n, r in results.items()
             if (r.get("evidence") or {}).get("confidence_histogram")}
    if not shown:
        return None
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(7.2, 1.75 * rows), sharex=True, squeeze=False)
    for axes, (name, histogram) in zip(grid.flat, shown.items(), strict=False):
        edges = np.asarray(histogram["edges"])
        for subset in ("retain", "test", "forget"):
            counts = np.asarray(histogram.get(subset, []), dtype=float)
            if counts.size and counts.sum() > 0:
                axes.stairs(counts / counts.sum(), edges, label=subset, color=SET_COLORS[subset],
                            linewidth=1.6 if subset == "forget" else 1.0, fill=subset == "forget", alpha=0.85
                            if subset != "forget" else 0.35)
        axes.set_title(name, fontsize=8.5, loc="left")
        axes.set_yscale("log")
        axes.set_ylim(1e-3, 1.2)
    for axes in grid.flat[len(shown):]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=7, frameon=False, loc="upper left")
    figure.supxlabel("confidence in the true label", fontsize=8)
    figure.supylabel("share of examples (log)", fontsize=8)
    figure.suptitle("Forget vs retain: a model that never saw the forget set is less sure of it",
                    x=0.01, ha="left", fontsize=9)
    figure.tight_layout()
    return _data_uri(figure)


def mia_roc(results: dict[str, Any]) -> str | None:
    """ROC of the log-odds membership attack, forget (positives) vs test (negatives), per result."""
    curves = {n: r["evidence"]["mia_roc"] for n, r in results.items() if (r.get("evidence") or {}).get("mia_roc")}
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(5.6, 3.4))
    axes.plot([0, 1], [0, 1], color="#afb8c1", linestyle=":", linewidth=1, label="chance")
    for index, (name, curve) in enumerate(curves.items()):
        roc = curve["forget_vs_test"]
        auc = _after(results[name], "mia_auc")
        label = f"{name} (AUC {auc:.2f})" if auc is not None else name
        axes.plot(roc["fpr"], roc["tpr"], color=_color(name, index), linewidth=1.4, label=label)
    axes.set_xlabel("false positive rate (test examples called members)")
    axes.set_ylabel("true positive rate (forget examples called members)")
    axes.set_title("Membership attack on the forget set", loc="left", fontsize=9)
    axes.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes.set_aspect("equal")
    return _data_uri(figure)


def relearning_curves(results: dict[str, Any]) -> str | None:
    """The robustness battery's relearning curves: the primary forgetting metric against fine-tuning steps, one
    panel per attacker data set, one line per result (the reference relearns too: its line is the baseline)."""
    attacked = {name: r["robustness"] for name, r in results.items() if r.get("robustness")}
    if not attacked:
        return None
    first = next(iter(attacked.values()))
    primary, sets = first["budget"]["primary"], list(first["relearning"])
    if not sets:
        return None
    figure, grid = plt.subplots(1, len(sets), figsize=(7.2, 2.6), sharey=True, squeeze=False)
    for axes, relearn_set in zip(grid.flat, sets, strict=True):
        for index, (name, entry) in enumerate(attacked.items()):
            curve = entry["relearning"].get(relearn_set)
            if curve and curve["metrics"].get(primary):
                axes.plot(curve["steps"], curve["metrics"][primary], marker="o", markersize=3, label=name,
                          color=_color(name, index), linewidth=2.0 if name == "retrain" else 1.3)
        axes.set_title(first["relearning"][relearn_set]["about"], loc="left", fontsize=7.5, wrap=True)
        axes.set_xlabel("fine-tuning steps of the attacker")
    grid.flat[0].set_ylabel(plain_label(primary))
    grid.flat[-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle("Does the forgetting hold? Relearning attacks", x=0.01, ha="left", fontsize=9)
    figure.tight_layout()
    return _data_uri(figure)


def _after(result: dict[str, Any], metric: str) -> float | None:
    value = result.get("metrics", {}).get("after", {}).get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def all_figures(record: dict[str, Any], metrics: Sequence[str]) -> dict[str, str]:
    results = record["results"]
    figures = {
        "metrics": metric_comparison(results, [m for m in metrics if m not in ("time_vs_retrain",)]),
        "mask_density": mask_density(results),
        "confidence": confidence_histograms(results),
        "mia_roc": mia_roc(results),
        "relearning": relearning_curves(results),
    }
    return {name: uri for name, uri in figures.items() if uri}
