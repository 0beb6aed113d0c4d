"""Smoke test of benchmarks/gpu.py: its CPU size runs in seconds and prints every stage (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_benchmark_small_prints_every_stage(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARKS / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_benchmark", gpu)
    spec.loader.exec_module(gpu)
    gpu.main(["--size", "small"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device: CPU")
    rows = {line[:22].strip(): line for line in lines[3:]}
    assert list(rows) == list(gpu.STAGES)
    for stage, line in rows.items():
        milliseconds = float(line[22:34])
        assert milliseconds > 0, stage
    assert "throughput of bare" in rows["scores (saliency)"]
    assert "1,208,640 of 2,417,280 scores" in rows["top-k (global, 50%)"]  # the 50% mask over the whole model
    assert "x unmasked" in rows["masked AdamW step"]
