"""Same answer on every machine: run embedded scenarios under several CPU kernel sets and print how far each metric
moves, whether each verdict holds, and whether the output files are bit-identical.

    .venv/bin/python benchmarks/kernels.py                                   # the four classification scenarios
    .venv/bin/python benchmarks/kernels.py --scenarios diffusion-forget-class --no-retrain
    .venv/bin/python benchmarks/kernels.py --summary                         # re-print from the runs on disk

`ATEN_CPU_CAPABILITY` makes PyTorch dispatch to a lower kernel set than the CPU offers (AVX-512 -> AVX2 ->
DEFAULT), a stand-in for another machine's CPU. Every run gets its own empty `SAFEEDIT_CACHE` (nothing trained
by an earlier run is reused) and runs as `safeedit run SCENARIO --no-pdf --quiet` in a subprocess. Runs go to
`benchmarks/results/kernels/<scenario>-<kernel>/`; the table goes to stdout and `benchmarks/results/kernels.txt`.
`--no-retrain` runs a copy of the scenario without its retrained reference (for the diffusion scenario, whose
criteria do not name it and whose retraining dominates the run time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KERNELS = ("native", "avx2", "default")
CLASSIFICATION = ("digits-forget-class", "digits-forget-random", "fashion-forget-class", "fashion-forget-random")
METRICS = ("ua", "ra", "ta", "mia_efficacy", "gap_to_retrain", "forgetting_accuracy", "retain_accuracy",
           "frechet_distance", "avg_accuracy", "backdoor_asr", "transfer_asr")


def run(scenario: str, kernel: str, runs: Path, no_retrain: bool) -> None:
    source = ROOT / "scenarios" / f"{scenario}.yaml"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if kernel != "native":
        env["ATEN_CPU_CAPABILITY"] = kernel
    with tempfile.TemporaryDirectory() as scratch:
        env["SAFEEDIT_CACHE"] = str(Path(scratch) / "cache")
        if no_retrain:
            text = yaml.safe_load(source.read_text(encoding="utf-8"))
            source = Path(scratch) / source.name
            source.write_text(yaml.safe_dump({**text, "retrain": None}), encoding="utf-8")
        out = runs / f"{scenario}-{kernel}"
        command = [sys.executable, "-m", "safeedit", "run", str(source), "--out", str(out), "--no-pdf", "--quiet"]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        print(f"[kernels] {scenario} under {kernel}: exit {done.returncode}", file=sys.stderr, flush=True)
        if done.returncode not in (0, 1):
            print(done.stderr[-2000:], file=sys.stderr)


def summary(scenarios: list[str], kernels: list[str], runs: Path) -> str:
    lines = []
    for scenario in scenarios:
        records = {k: json.loads((runs / f"{scenario}-{k}" / "record.json").read_text()) for k in kernels
                   if (runs / f"{scenario}-{k}" / "record.json").is_file()}
        if not records:
            continue
        first = next(iter(records.values()))
        verdicts = {k: r["verdict"]["passed"] for k, r in records.items()}
        shown = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdicts.items())
        same = " (the same under every kernel set)" if len(set(verdicts.values())) == 1 else " (DIFFERS)"
        lines += [f"\n## {scenario}: verdict {shown}{same}",
                  f"| result | metric | {' | '.join(records)} | spread (points) |", "|---|---|" + "---|" * len(records)
                  + "---|"]
        worst = 0.0
        for result in first["results"]:
            for metric in METRICS:
                values = [r["results"][result]["metrics"]["after"].get(metric) for r in records.values()]
                if any(v is None for v in values):
                    continue
                scale = 1 if metric == "frechet_distance" else 100
                spread = (max(values) - min(values)) * scale
                worst = max(worst, spread) if scale == 100 else worst
                lines.append(f"| {result} | {metric} | " + " | ".join(f"{v * scale:.2f}" for v in values)
                             + f" | {spread:.2f} |")
        margins = [min(abs(row["measured"] - row["threshold"]) for r in records.values()
                       for row in r["verdict"]["criteria"] if row["check"] == check["check"])
                   for check in first["verdict"]["criteria"]]
        identical = {entry["path"]: len({next(e["sha256"] for e in r["outputs"] if e["path"] == entry["path"])
                                         for r in records.values()}) == 1 for entry in first["outputs"]}
        lines.append(f"largest spread of a percentage metric: {worst:.2f} points; smallest distance of a criterion "
                     f"from its threshold: {min(margins) * 100:.2f} points" if margins else "no criteria")
        lines.append("bit-identical outputs across kernel sets: " + (", ".join(p for p, same in identical.items()
                                                                              if same) or "none"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(CLASSIFICATION))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--runs", type=Path, default=RESULTS / "kernels", help="where the runs are written / read")
    parser.add_argument("--no-retrain", action="store_true", help="drop the scenario's retrained reference")
    parser.add_argument("--summary", action="store_true", help="only print the table from the runs on disk")
    args = parser.parse_args()
    if not args.summary:
        for scenario in args.scenarios:
            for kernel in args.kernels:
                run(scenario, kernel, args.runs, args.no_retrain)
    text = summary(args.scenarios, args.kernels, args.runs)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.txt").write_text(text.lstrip() + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
