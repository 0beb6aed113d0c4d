"""The run record: what was asked, which files went in and came out (with SHA-256), the environment, every
result and the verdict of the scenario's criteria. Reports are rendered from the record alone (DESIGN.md
sections 6-7 name the keys); `Record` is its schema, published as `safeedit/report/schema.json`.

Integrity: ``integrity.sha256`` is the SHA-256 of the record's canonical bytes (`canonical_bytes`: every key
except ``integrity``, keys sorted, no whitespace, UTF-8). Editing any value without recomputing it is detected by
`safeedit verify`; a detached Ed25519 signature over the same bytes (`safeedit report --sign`) also detects
an edit that recomputed it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import ConfigDict, Field

from safeedit.config import Strict
from safeedit.errors import SafeEditError, first_problem
from safeedit.io import sha256_file, write_text_atomic

SCHEMA = "safeedit.record/2"
SHA256 = r"^[0-9a-f]{64}$"

# DESIGN.md section 7, plus the attack-power companions the classification metrics report.
METRIC_LABELS: dict[str, str] = {
    "ua": "Unlearning accuracy (1 − forget accuracy)",
    "ra": "Retain accuracy",
    "ta": "Test accuracy",
    "mia_efficacy": "MIA-efficacy (forget set judged unseen)",
    "mia_attack_accuracy": "Membership attack's own accuracy",
    "mia_auc": "Membership attack AUC, forget vs test",
    "mia_auc_retain_vs_test": "Membership attack AUC, retain vs test",
    "gap_to_retrain": "Gap to retrain (mean |Δ| of UA, RA, TA, MIA-efficacy)",
    "time_vs_retrain": "Time vs retrain (run time relative to retraining)",
    "forget_quality": "Forget quality (KS p-value vs retrain)",
    "truth_ratio_forget": "Truth ratio on the forget set",
    "rouge_l_forget": "ROUGE-L recall, forget",
    "rouge_l_retain": "ROUGE-L recall, retain",
    "truth_ratio_retain": "Truth ratio on the retain set (mean max(0, 1 − R))",
    "probability_forget": "Answer probability, forget (per token)",
    "probability_retain": "Answer probability, retain (per token)",
    "model_utility": "Model utility",
    "perplexity": "Perplexity",
    "forget_accuracy": "Forget accuracy",
    "retain_accuracy": "Retain accuracy",
    "harmful_score": "Harmful score (share of held-out harmful prompts answered, not refused)",
    "finetune_accuracy": "Fine-tune accuracy (user task, test split)",
    "finetune_rouge_l": "ROUGE-L recall, user task (expected answers)",
    "benign_refusal_rate": "Benign refusal rate (held-out benign prompts refused)",
    "weights_zeroed": "Share of the pruned layers' weights removed",
    "avg_accuracy": "Average task accuracy",
    "backdoor_asr": "Attack success rate, backdoored task",
    "transfer_asr": "Attack success rate, clean tasks (mean; the trigger's transfer)",
    "forgetting_accuracy": "Forgetting accuracy",
    "frechet_distance": "Fréchet distance (judge features, generated vs real retain images)",
    "forget_class_share": "Share of all samples judged as the forget class",
}
SHORT_LABELS: dict[str, str] = {
    "ua": "UA", "ra": "RA", "ta": "TA", "mia_efficacy": "MIA-efficacy", "gap_to_retrain": "Gap to retrain",
    "time_vs_retrain": "Time vs retrain", "forgetting_accuracy": "Forgetting acc.", "retain_accuracy": "Retain acc.",
    "frechet_distance": "Fréchet dist.", "forget_class_share": "Judged as forget class",
    "benign_refusal_rate": "Benign refused", "weights_zeroed": "Weights removed", "avg_accuracy": "Avg. accuracy",
    "backdoor_asr": "Backdoor ASR", "transfer_asr": "Transfer ASR", "forget_quality": "Forget quality",
    "truth_ratio_forget": "Truth ratio (forget)", "rouge_l_forget": "ROUGE-L forget",
    "rouge_l_retain": "ROUGE-L retain", "model_utility": "Model utility", "mia_auc": "MIA AUC",
    "forget_accuracy": "Forget acc.",
}


PER_TASK_LABELS = {"accuracy_": "Accuracy", "asr_": "ASR"}  # accuracy_<task>, asr_<task> (model merging)


def plain_label(metric: str) -> str:
    """The metric's label without its parenthesised explanation, e.g. 'Unlearning accuracy'."""
    for prefix, label in PER_TASK_LABELS.items():
        if metric.startswith(prefix) and metric not in METRIC_LABELS:
            return f"{label}, {metric[len(prefix):]}"
    return METRIC_LABELS.get(metric, metric).split(" (")[0]


def short_label(metric: str) -> str:
    """A column-sized name: SHORT_LABELS, else `plain_label`."""
    return SHORT_LABELS.get(metric) or plain_label(metric).replace("Accuracy, ", "Acc. ").replace("ASR, ", "ASR ")


COUNT_METRICS = frozenset({"n_forget", "n_retain", "n_test", "mia_train_size", "n_generated_per_class"})


class FileEntry(Strict):
    path: str = Field(description="outputs: relative to the record's folder; inputs: as given to the run")
    role: str
    sha256: str = Field(pattern=SHA256)


class FolderEntry(FileEntry):
    """An output folder (a `save_pretrained` model): every file in it, and how to load it."""

    sha256: str = Field(pattern=SHA256, description="SHA-256 of the folder's listing (`listing_sha256`)")
    files: dict[str, Annotated[str, Field(pattern=SHA256)]] = Field(
        description="each file, relative to the folder (POSIX), -> its SHA-256")
    load: str = Field(description="the Python expression that loads the folder once its library is imported, e.g. "
                                  'transformers.AutoModelForSequenceClassification.from_pretrained("runs/x/salun")')


class Fingerprint(Strict):
    count: int = Field(ge=0)
    ids_sha256: str = Field(pattern=SHA256)


class RequestText(Strict):
    what: str
    requested_by: str
    reason: str
    date: str | None


class Metrics(Strict):
    before: dict[str, float | int | None] | None = None
    after: dict[str, float | int | None]


class LayerDensity(Strict):
    name: str
    selected: int
    total: int
    density: float


class MaskSummary(Strict):
    path: str
    selected: int
    total: int
    density: float
    layers: list[LayerDensity]


class LayerChange(Strict):
    name: str
    changed: int
    total: int


class WeightChanges(Strict):
    changed: int
    total: int
    share: float
    changed_outside_mask: int | None
    layers: list[LayerChange]


class About(Strict):
    summary: str
    limitations: str


class Result(Strict):
    metrics: Metrics
    wall_time_s: float | None = None
    seed: int | None = None
    options: dict[str, Any] | None = None
    mask: MaskSummary | None = None
    weight_changes: WeightChanges | None = None
    evidence: dict[str, Any] | None = Field(default=None, description="plot data: histograms, ROC curves")
    about: About | None = None
    robustness: dict[str, Any] | None = Field(
        default=None, description="the robustness battery's curves and tables (relearning, quantization, the kind's "
        "own attacks) and its budget; its figures are also among the metrics (relearn_<metric>@<k>, "
        "<metric>_int4, ...)")


class CriterionRow(Strict):
    check: str
    why: str
    result: str
    metric: str
    operator: str
    measured: float | None
    threshold: float | None
    passed: bool
    note: str


class Verdict(Strict):
    passed: bool | None = Field(description="True only if every criterion passed; null when none were declared")
    criteria: list[CriterionRow]


class Integrity(Strict):
    algorithm: Literal["sha256"] = "sha256"
    canonical: str = "JSON of every key but 'integrity', keys sorted, separators (',', ':'), UTF-8"
    sha256: str = Field(pattern=SHA256)


class Record(Strict):
    """A run record, schema `safeedit.record/2`."""

    model_config = ConfigDict(extra="forbid", title="safeedit run record", populate_by_name=True)
    schema_: Literal["safeedit.record/2"] = Field(alias="schema")
    created: str
    kind: str = Field(description="what the run did, e.g. 'classification-unlearning'")
    request: RequestText
    scenario: dict[str, Any]
    command: str = Field(description="the command that reproduces the run, from `working_directory`")
    working_directory: str
    inputs: list[FileEntry]
    outputs: list[FolderEntry | FileEntry]
    data: dict[str, Fingerprint]
    model: dict[str, Any]
    reference: dict[str, Any] | None = Field(
        default=None, description="the model trained without the forget data that the 'retrain' result is "
        "(classification: kind retrained-from-scratch | fine-tuned-from-base | given | none, source, recipe, seed, "
        "what it was trained on); null for kinds that do not state it")
    seeds: dict[str, int]
    environment: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = Field(default_factory=list, description="caveats the runner found, in plain words")
    mia_informative: bool | None = None
    results: dict[str, Result]
    verdict: Verdict
    integrity: Integrity


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of the record (written to safeedit/report/schema.json)."""
    schema = Record.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA, **schema}


def file_entry(path: str | os.PathLike, role: str, relative_to: Path | None = None,
               sha256: str | None = None) -> dict[str, str]:
    """A record's file entry; `sha256` saves re-reading a file whose hash the caller already computed."""
    path = Path(path)
    shown = path.relative_to(relative_to) if relative_to and path.is_relative_to(relative_to) else path
    return {"path": str(shown), "role": role, "sha256": sha256 or sha256_file(path)}


def folder_entry(folder: Path, role: str, load: str, relative_to: Path) -> dict[str, Any]:
    """A record's entry for an output folder: every file below it with its SHA-256, and the listing's hash."""
    files = {path.relative_to(folder).as_posix(): sha256_file(path)
             for path in sorted(folder.rglob("*")) if path.is_file()}
    return {"path": folder.relative_to(relative_to).as_posix(), "role": role, "sha256": listing_sha256(files),
            "files": files, "load": load}


def listing_sha256(files: dict[str, str]) -> str:
    """One hash for a folder: the SHA-256 of its listing, one `<sha256>  <name>` line per file sorted by name (what
    `sha256sum` prints), so a folder is named by one value and any file's change changes it."""
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def output_files(record: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every output file the record names, folder outputs expanded (run-folder-relative POSIX path -> (SHA-256,
    role))."""
    named = {}
    for entry in record["outputs"]:
        if "files" in entry:
            named.update({f"{entry['path']}/{name}": (digest, entry["role"])
                          for name, digest in entry["files"].items()})
        else:
            named[entry["path"]] = (entry["sha256"], entry["role"])
    return named


def environment(device: torch.device) -> dict[str, Any]:
    import datasets
    import numpy
    import safetensors
    import sklearn
    import transformers

    import safeedit

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "safeedit": safeedit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "safetensors": safetensors.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        **cpu_numerics(),
    }


def cpu_numerics() -> dict[str, Any]:
    """What decides CPU floating point, so a re-run elsewhere can be judged: the CPU, the kernel set PyTorch
    dispatches to (AVX512, AVX2, DEFAULT; `ATEN_CPU_CAPABILITY` lowers it), BLAS, and MKL's reproducibility mode."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    return {
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "blas": blas.group(1) if blas else "unknown",
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _plain(value: Any) -> Any:
    """JSON-native copy: NaN and infinities become null (JSON has none), dates and paths become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def canonical_bytes(record: dict[str, Any]) -> bytes:
    """The bytes the integrity hash and the signature cover: every key except 'integrity', sorted, compact."""
    body = {key: value for key, value in record.items() if key != "integrity"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


def write_record(record: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Stamp schema, creation time and integrity hash; validate against `Record`; write atomically."""
    record = _plain({"schema": SCHEMA, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record})
    record["integrity"] = Integrity(sha256="0" * 64).model_dump()
    record = validate_record(record, str(path)).model_dump(mode="json", by_alias=True)  # every key present
    record["integrity"] = Integrity(sha256=record_digest(record)).model_dump()
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    stale_signature = Path(f"{path}.sig")  # a signature of the record this one replaces no longer applies
    stale_signature.unlink(missing_ok=True)
    return record


def validate_record(record: Any, where: str) -> Record:
    try:
        return Record.model_validate(record)
    except pydantic.ValidationError as error:
        raise SafeEditError(f"{where}: not a {SCHEMA} record ({first_problem(error)})") from None


def record_file(target: str | os.PathLike) -> Path:
    """The record a command was pointed at: `target` itself, or the record.json of run folder `target`."""
    target = Path(target)
    return target / "record.json" if target.is_dir() else target


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Load and schema-check a record file (or the record.json of a run folder)."""
    path = record_file(path)
    if not path.is_file():
        raise SafeEditError(f"{path}: no such record; give a run folder (with record.json) or a record file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SafeEditError(f"{path}: not valid JSON ({error}); the record is damaged") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise SafeEditError(f"{path}: record schema {found!r} is not {SCHEMA!r}; re-run the scenario to rewrite it")
    validate_record(record, str(path))
    return record
