"""Smoke tests of the scaling benchmarks: benchmarks/gpu.py at its CPU size, benchmarks/scale.py's jobs at 2.4M
parameters (seconds each; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(monkeypatch, name: str = "gpu"):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"{name}_benchmark", module)
    spec.loader.exec_module(module)
    return module


def rows_of(text: str) -> dict[str, str]:
    return {line[:22].strip(): line for line in text.splitlines()[3:]}


def test_gpu_benchmark_small_prints_every_stage(monkeypatch, capsys):
    gpu = load(monkeypatch)
    gpu.main(["--size", "small"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device: CPU")
    rows = rows_of("\n".join(lines))
    assert list(rows) == list(gpu.STAGES)
    for stage, line in rows.items():
        assert float(line[22:34]) > 0, stage  # a time in milliseconds
        assert "FAILED" not in line, line
    assert "throughput of bare" in rows["scores (saliency)"]
    assert "1,208,640 of 2,417,280 scores" in rows["top-k (global, 50%)"]  # the 50% mask over the whole model
    assert "x unmasked" in rows["masked AdamW step"]


def test_a_failing_stage_is_reported_and_the_rest_still_run(monkeypatch):
    gpu = load(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this\nsecond line")

    monkeypatch.setattr(gpu.Mask, "top_k", broken)
    rows = rows_of(gpu.table(*gpu.run("small", gpu.torch.device("cpu"))))
    assert rows["top-k (global, 50%)"].endswith("FAILED: RuntimeError: no kernel for this")
    assert "x unmasked" in rows["masked AdamW step"]  # measured with a random 50% mask instead


def test_scale_benchmark_jobs_measure_time_and_memory(monkeypatch):
    scale = load(monkeypatch, "scale")
    args = scale.argparse.Namespace(size="3M", batches=1, batch_size=1, length=8, dtype="float32", threads=1)
    score = scale.job_score(args)
    assert score["params"] == 2_417_280
    assert score["bare_seconds"] > 0 and score["score_seconds"] > 0
    for job in (scale.job_select, scale.job_merge):
        result = job(args)
        assert result["params"] == 2_417_280 and result["seconds"] > 0
        if sys.platform == "linux":  # the peak resident set is read from /proc
            assert result["extra"] is not None
    ok, why = scale.fits("merge", 10**15, "float32")
    assert not ok and why.startswith("skipped: needs ~")
