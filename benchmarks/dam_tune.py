"""Hyper-parameter search for the learned merges, with the same budget for each method: four configurations of
AdaMerging (learning rate), and four of the Concrete gates shared by Concrete task arithmetic and DAM (initial
logit × learning rate). This is the tune half of `PROTOCOL = Protocol(tune=(0,), report=(1, 2, 3))`: the search sees
the development seed 0 only; benchmarks/dam.py reports seeds 1, 2, 3 with the chosen values.

    .venv/bin/python benchmarks/dam_tune.py --setting vision
    .venv/bin/python benchmarks/dam_tune.py --setting text

Selection rule, the same for every method and fixed before the search: the configuration with the highest
average clean accuracy minus backdoor attack success rate on seed 0 (a defender's utility; `highest_mean`, ties to
the first configuration). The chosen values are written into the scenarios by hand;
benchmarks/results/dam-tune-<setting>.json keeps every measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from dam import run_benchmark_scenario

from safeedit.protocol import Candidate, Protocol, highest_mean

ROOT = Path(__file__).resolve().parent.parent
ADAMERGING_LR = (0.003, 0.01, 0.03, 0.1)
GATES = ((3.0, 0.1), (3.0, 0.3), (1.0, 0.1), (1.0, 0.3))  # (init_logit, lr)
LEARNED = ("adamerging", "concrete_ta", "dam")
PROTOCOL = Protocol(tune=(0,), report=(1, 2, 3))  # the report seeds are dam.py's (its --seeds default)
(SEED,) = PROTOCOL.tune


def utility(metrics: dict) -> float:
    """The selection metric: average clean accuracy minus backdoor attack success rate."""
    return metrics["avg_accuracy"] - metrics["backdoor_asr"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["vision", "text"], required=True)
    args = parser.parse_args()
    results_path = Path(__file__).parent / "results" / f"dam-tune-{args.setting}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"configs": []}
    base = yaml.safe_load((ROOT / "scenarios" / f"merge-{args.setting}-backdoor.yaml").read_text())
    for index, (ada_lr, (init, lr)) in enumerate(zip(ADAMERGING_LR, GATES, strict=True)):
        if any(c["index"] == index for c in results["configs"]):
            continue
        scenario = dict(base, name=f"dam-tune-{args.setting}-{index}", seed=SEED, criteria=[])
        scenario.pop("robustness", None)  # the search compares the merges as they are (dam.py --robustness attacks)
        steps = base["methods"]["dam"]["steps"]
        scenario["methods"] = {"adamerging": {"granularity": "layer", "steps": steps, "lr": ada_lr},
                               "concrete_ta": {"steps": steps, "init_logit": init, "lr": lr},
                               "dam": {"steps": steps, "init_logit": init, "lr": lr}}
        record = run_benchmark_scenario(scenario, progress=False)
        results["configs"].append({"index": index, "methods": scenario["methods"], "metrics": {
            name: record["results"][name]["metrics"]["after"] for name in LEARNED}})
        results_path.write_text(json.dumps(results, indent=1))
    print(f"{args.setting}, seed {SEED}: avg accuracy / backdoor ASR / utility (avg − ASR)")
    configs = sorted(results["configs"], key=lambda c: c["index"])
    for name in LEARNED:
        # Each configuration a candidate with its one tune trial (seed 0's metrics).
        candidates = [Candidate(config["methods"][name], [config["metrics"][name]]) for config in configs]
        chosen = highest_mean(utility)(candidates)
        for index, candidate in enumerate(candidates):
            (m,) = candidate.trials
            mark = "  <- chosen" if index == chosen else ""
            print(f"  {name:12s} {json.dumps(candidate.config):70s} {m['avg_accuracy']:.3f} / "
                  f"{m['backdoor_asr']:.3f} / {utility(m):+.3f}{mark}")


if __name__ == "__main__":
    main()
