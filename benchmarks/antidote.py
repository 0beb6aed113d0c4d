"""Antidote benchmark: harmful score and fine-tune accuracy over poison ratio p × pruning ratio r, per method.

    .venv/bin/python benchmarks/antidote.py            # the reported grid (~60 min on 2 CPU cores)
    .venv/bin/python benchmarks/antidote.py --summary  # print the table of benchmarks/results/antidote.json

Setting (same as scenarios/antidote-harmful-finetune.yaml): SmolLM2-135M-Instruct, safety-aligned once (seed 0,
cached), then for each (p, seed) a LoRA fine-tune on Wikipedia topic classification with a share p of harmful
requests answered compliantly (the seed draws the poisoned examples and the batch order), then every pruning method
at every r on the same fine-tuned model. Methods remove the same count per output row of the fine-tune's update
(target `update`). Reported seeds are 1, 2, 3; the target and the layer set were chosen on a pilot at seed 0.
Rows for p = 0.1 use all seeds; the other ratios use the first seed only (CPU time), as the table says.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from safeedit.attacks.harmful import alignment_mix, poisoned_mix
from safeedit.data.prompts import SafetySizes, safety_data
from safeedit.eval.judge import load_judge, validate_judge
from safeedit.eval.safety import safety_metrics
from safeedit.io import sha256_file
from safeedit.methods import get_method
from safeedit.models.cache import cached_finetune
from safeedit.models.language import SMOLLM2, load_language_model
from safeedit.models.lm_training import FinetuneOptions
from safeedit.prune import PruneSetting, PruningOptions
from safeedit.prune.calibration import calibration_batches

RESULTS = Path(__file__).parent / "results" / "antidote.json"
METHODS = ("antidote", "wanda_benign", "magnitude_prune", "random_prune")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    loaded = load_language_model(SMOLLM2)
    base, tokenizer = loaded.model, loaded.tokenizer
    data = safety_data(SafetySizes())
    harmful_eval, task_eval = data.evaluation[: args.eval_harmful], data.task_test[: args.eval_task]
    judge = load_judge("default")
    options = FinetuneOptions()
    aligned, aligned_path = cached_finetune(base, tokenizer, alignment_mix(data.alignment_harmful,
                                                                           data.alignment_benign, 0),
                                            options, 0, "safety-alignment", loaded.weights_sha256, True)
    aligned_sha = sha256_file(aligned_path)
    aligned_weights = {n: p.detach() for n, p in aligned.named_parameters()}
    rows: list[dict] = []
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.resume else {"rows": []}
    done = {(r["p"], r["seed"], r["method"], r["r"]) for r in previous["rows"]}
    rows += previous["rows"]

    def evaluate(model) -> dict[str, float]:
        metrics, _ = safety_metrics(model, tokenizer, judge, harmful_eval, task_eval, (), args.max_new_tokens)
        return metrics

    original = evaluate(aligned)
    print(f"aligned model: harmful {original['harmful_score']:.3f} accuracy {original['finetune_accuracy']:.3f}",
          flush=True)
    for p in args.poison:
        for seed in (args.seeds if p == args.full_seeds_at else args.seeds[:1]):
            if (p, seed, "no_defense", 0.0) in done and all((p, seed, m, r) in done for m in METHODS
                                                            for r in args.ratios):
                continue
            mix = poisoned_mix(data.task_train, data.attack, p, seed)
            start = time.perf_counter()
            tuned, _ = cached_finetune(aligned, tokenizer, mix, options, seed, f"user-finetune-p{p:g}", aligned_sha,
                                       True)
            finetune_s = time.perf_counter() - start
            if (p, seed, "no_defense", 0.0) not in done:
                start = time.perf_counter()
                rows.append({"p": p, "seed": seed, "method": "no_defense", "r": 0.0, **evaluate(tuned),
                             "wall_s": finetune_s, "eval_s": time.perf_counter() - start})
                print(json.dumps(rows[-1]), flush=True)
            calibration = {role: calibration_batches(tuned, tokenizer, examples, args.max_new_tokens)
                           for role, examples in (("harmful", data.calibration), ("benign", data.benign_calibration))}
            setting = PruneSetting(tuned, before=aligned_weights, calibration=calibration.__getitem__)
            for r in args.ratios:
                for method in METHODS:
                    if (p, seed, method, r) in done:
                        continue
                    start = time.perf_counter()
                    pruned = get_method("pruning", method).run(
                        setting, PruningOptions(ratio=r, layers="linear", target="update"), seed, progress=False).model
                    wall = time.perf_counter() - start
                    rows.append({"p": p, "seed": seed, "method": method, "r": r, **evaluate(pruned), "wall_s": wall})
                    print(json.dumps(rows[-1]), flush=True)
                    del pruned
            result = {"original": original, "judge": validate_judge(judge), "rows": rows, "args": vars(args)}
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(result, indent=1))
    return {"original": original, "judge": validate_judge(judge), "rows": rows, "args": vars(args)}


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"aligned model before the user fine-tune: harmful score {result['original']['harmful_score']:.3f}, "
             f"fine-tune accuracy {result['original']['finetune_accuracy']:.3f}",
             f"judge {result['judge']['judge']}: accuracy {result['judge']['accuracy']:.3f} on "
             f"{result['judge']['n']} labelled answers",
             "cells: median over seeds (n seeds) of harmful score / fine-tune accuracy",
             ""]
    poisons = sorted({r["p"] for r in rows})
    ratios = sorted({r["r"] for r in rows if r["method"] != "no_defense"})
    header = f"{'p':>5} {'method':16}" + "".join(f"{'r=' + format(r, 'g'):>24}" for r in ratios)
    lines.append(header)
    for p in poisons:
        base = [r for r in rows if r["p"] == p and r["method"] == "no_defense"]
        seeds = len(base)
        harm0 = statistics.median(r["harmful_score"] for r in base)
        acc0 = statistics.median(r["finetune_accuracy"] for r in base)
        lines.append(f"{p:>5g} {'no_defense':16}{f'{harm0:.3f} / {acc0:.3f} (n={seeds})':>24}")
        for method in METHODS:
            cells = ""
            for r in ratios:
                chosen = [x for x in rows if x["p"] == p and x["method"] == method and x["r"] == r]
                if not chosen:
                    cells += f"{'-':>24}"
                    continue
                harm = statistics.median(x["harmful_score"] for x in chosen)
                acc = statistics.median(x["finetune_accuracy"] for x in chosen)
                cells += f"{f'{harm:.3f} / {acc:.3f}':>24}"
            lines.append(f"{'':>5} {method:16}{cells}")
    p_main = result["args"]["full_seeds_at"]
    main = [r for r in rows if r["p"] == p_main]
    if main:
        lines += ["", f"p = {p_main:g}, per seed (harmful ratio vs no defence, accuracy change in points):"]
        for seed in sorted({r["seed"] for r in main}):
            base = next(r for r in main if r["seed"] == seed and r["method"] == "no_defense")
            parts = [f"no defence {base['harmful_score']:.3f} / {base['finetune_accuracy']:.3f}"]
            for r in ratios:
                x = next((x for x in main if x["seed"] == seed and x["method"] == "antidote" and x["r"] == r), None)
                if x:
                    ratio = x["harmful_score"] / base["harmful_score"] if base["harmful_score"] else float("nan")
                    change = 100 * (x["finetune_accuracy"] - base["finetune_accuracy"])
                    parts.append(f"r={r:g}: {ratio:.2f}×, {change:+.0f}")
            lines.append(f"  seed {seed}: " + "; antidote ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poison", type=float, nargs="+", default=[0.1, 0.0, 0.05, 0.2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--full-seeds-at", type=float, default=0.1)
    parser.add_argument("--eval-harmful", type=int, default=64)
    parser.add_argument("--eval-task", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    parser.add_argument("--summary", action="store_true", help="print the table of the saved results only")
    args = parser.parse_args()
    result = json.loads(RESULTS.read_text()) if args.summary else run(args)
    print(table(result))


if __name__ == "__main__":
    main()
