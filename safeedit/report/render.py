"""Render a run record into the compliance report: one self-contained HTML file (inline CSS and SVG plots, no
network), a PDF of the same page printed by headless Chromium, and the record itself as the JSON rendering
(schema: safeedit/report/schema.json). Everything shown comes from the record; user text is escaped."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from safeedit.errors import SafeEditError
from safeedit.io import atomic_dir, atomic_path, make_folders, sha256_file, write_text_atomic
from safeedit.record import COUNT_METRICS, METRIC_LABELS, plain_label, read_record, record_file, short_label
from safeedit.report.chromium import html_to_pdf, screenshot
from safeedit.report.manifest import write_manifest
from safeedit.report.plots import all_figures
from safeedit.report.robustness import robustness_view
from safeedit.report.signing import read_signature, sign_record, signature_path
from safeedit.report.texts import headline_metrics, kind_text
from safeedit.report.verify import verify_record

REFERENCE_ROWS = {"original": "before (original model)", "retrain": "reference (retrained without the data)"}
# The `retrain` row as what the reference was (record.reference.kind; records without one: REFERENCE_ROWS).
RETRAIN_ROWS = {"retrained-from-scratch": "reference (retrained from scratch without the data)",
                "fine-tuned-from-base": "reference (base fine-tuned without the data)",
                "given": "reference (given, trained without the data)"}


def reference_rows(record: dict[str, Any]) -> dict[str, str]:
    """The metrics table's labels of the reference rows, the `retrain` row saying what its reference was."""
    kind = (record.get("reference") or {}).get("kind")
    return {**REFERENCE_ROWS, **({"retrain": RETRAIN_ROWS[kind]} if kind in RETRAIN_ROWS else {})}


@dataclass
class ReportFiles:
    html: Path
    pdf: Path | None
    record: Path
    signature: Path | None
    png: Path | None = None


def format_metric(name: str, value: Any) -> str:
    """How a metric reads in the report: fractions as percentages, gaps in points, time as a ratio; a robustness
    figure (`relearn_<metric>@<k>`, `<metric>_int4`) as its metric."""
    name = _measured_metric(name)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "—" if value is None else str(value)
    if name in COUNT_METRICS or name == "n_steps":
        return f"{int(value):,}"
    if name == "gap_to_retrain":
        return f"{100 * value:.1f} pts"
    if name == "time_vs_retrain":
        return f"{value:.2f}×"
    if name in ("perplexity", "frechet_distance"):
        return f"{value:.2f}"
    if name in ("mia_auc", "mia_auc_retain_vs_test", "forget_quality"):
        return f"{value:.3g}"
    return f"{100 * value:.1f}%"


# Metrics that are not fractions, and how robustness figures name them (relearn_<set>_<metric>@<k>, <metric>_int4).
NOT_FRACTIONS = ("perplexity", "frechet_distance", "mia_auc", "forget_quality", "gap_to_retrain", "time_vs_retrain")


def _measured_metric(name: str) -> str:
    stripped = re.sub(r"@\d+$|_int[48]$", "", name)
    if stripped.startswith("steps_"):
        return "n_steps"
    return next((m for m in NOT_FRACTIONS if stripped == m or stripped.endswith("_" + m)), name)


def _environment():
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("safeedit.report", "templates"),
        autoescape=True,  # every user-supplied string (request, scenario, paths) is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["metric"] = lambda value, name: format_metric(name, value)
    environment.filters["seconds"] = lambda s: "—" if s is None else (f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min")
    return environment


def _headline(record: dict[str, Any]) -> list[str]:
    measured = {m for r in record["results"].values() for m in r["metrics"]["after"]}
    metrics = headline_metrics(record["kind"], measured)
    return metrics or sorted(m for m in measured if m not in COUNT_METRICS)


def _output_images(record: dict[str, Any], folder: Path) -> dict[str, str]:
    """Output images the run wrote (e.g. the sample grid), inlined only if their SHA-256 matches the record."""
    images = {}
    for entry in record["outputs"]:
        path = folder / entry["path"]
        if entry["role"] == "sample grid" and path.is_file() and sha256_file(path) == entry["sha256"]:
            images["samples"] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return images


def _copy_unless_same(source: Path, target: Path) -> Path:
    """Copy `source` to `target` atomically, unless they are the same file; returns `target`."""
    if target.resolve() != source.resolve():
        with atomic_path(target) as partial:
            shutil.copyfile(source, partial)
    return target


# How a run got its model's weights (record.model.origin).
ORIGIN_TEXT = {"shipped": "weights shipped with safeedit", "trained": "trained on this machine from the shipped recipe",
               "file": "weights from a file", "folder": "a model folder", "hub": "a hub model",
               "adapter": "a LoRA adapter folder on the base model its adapter_config.json names"}


def render_html(record: dict[str, Any], record_path: Path, verification, signature: dict | None,
                shown_folder: Path | None = None) -> str:
    """The report page as a string; `verification` is a `verify.Verification` run just before. `shown_folder` is
    the run folder the page names (default: the record's; a run renders inside its temporary folder)."""
    shown = (shown_folder or record_path.parent) / record_path.name
    metrics = _headline(record)
    edited = {name: {layer["name"]: layer for layer in r["weight_changes"]["layers"]}
              for name, r in record["results"].items() if r.get("weight_changes")}
    sizes = {name: layer["total"] for layers in edited.values() for name, layer in layers.items()}
    layer_changes = {"methods": list(edited), "layers": [
        (name, size, [layers[name]["changed"] / max(1, size) if name in layers else None for layers in edited.values()])
        for name, size in sizes.items()]}
    return _environment().get_template("report.html.j2").render(
        record=record,
        record_path=str(shown),
        run_folder=str(shown.parent),
        kind=kind_text(record["kind"]),
        metrics=metrics,
        labels=METRIC_LABELS,
        short={m: short_label(m) for m in metrics},
        reference_rows=reference_rows(record),
        ORIGIN_TEXT=ORIGIN_TEXT,
        figures={**all_figures(record, metrics), **_output_images(record, record_path.parent)},
        layer_changes=layer_changes,
        robustness=robustness_view(record["results"], plain_label, format_metric),
        verification=verification,
        signature=signature,
        scenario_yaml=yaml.safe_dump(record["scenario"], sort_keys=False, allow_unicode=True, width=100),
        generated=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def write_report(target: str | os.PathLike, out_dir: str | os.PathLike | None = None, pdf: bool = True,
                 sign_key: str | os.PathLike | None = None, shown_folder: Path | None = None,
                 png: bool = False) -> ReportFiles:
    """Render the record of run folder (or record file) `target` into `out_dir` (default: next to the record).

    With `sign_key`, first writes a detached Ed25519 signature of the record (`record.json.sig`). The record is
    verified (hashes of every file it names) before rendering, and the outcome is part of the report. Last, the
    folder's manifest hashes every file in it, report pages included (signed too, with `sign_key`). A new `out_dir`
    is written whole or not at all.
    """
    if out_dir is not None and not Path(out_dir).exists():
        final = Path(out_dir)
        with atomic_dir(final) as work:
            files = write_report(target, work, pdf, sign_key, shown_folder or final, png)
        return ReportFiles(**{key: final / path.name if path is not None else None
                              for key, path in vars(files).items()})
    record_path = record_file(target)
    record = read_record(record_path)
    out = Path(out_dir) if out_dir else record_path.parent
    if out.exists() and not out.is_dir():  # before signing: a bad --out writes nothing
        raise SafeEditError(f"{out} is a file; name a folder for the report")
    if sign_key is not None:
        sign_record(record, record_path, sign_key)
    verification = verify_record(record, record_path, folder_manifest=False)
    signature = read_signature(record_path)
    make_folders(out)
    record_copy = _copy_unless_same(record_path, out / "record.json")
    signature_copy = (_copy_unless_same(signature_path(record_path), signature_path(record_copy))
                      if signature is not None else None)
    html = out / "report.html"
    write_text_atomic(html, render_html(record, record_path, verification, signature, shown_folder))
    pdf_path = html_to_pdf(html, out / "report.pdf") if pdf else None
    png_path = screenshot(html, out / "report.png", width=794, height=1123) if png else None
    write_manifest(out, record["integrity"]["sha256"], sign_key)
    return ReportFiles(html, pdf_path, record_copy, signature_copy, png_path)
