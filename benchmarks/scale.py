"""How time and peak memory grow with model size (random-init Llama configs, benchmarks/measure.py's SIZES) for
scoring (saliency), selection (global top-k) and merging (task arithmetic of two models), on the CPU.

    python benchmarks/scale.py                                 # 10M, 25M, 50M parameters, 1 thread (a few minutes)
    python benchmarks/scale.py --sizes 10M 100M 300M 1B        # up to 1.1B (peak ~14 GiB scoring, see below)
    python benchmarks/scale.py --sizes 1B --dtype bfloat16     # a bf16 model: weights and gradients in 2 bytes

Every measurement runs in its own fresh process (`--job`), so one stage's freed memory cannot hide another's growth;
the processes run with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident
set at once. Memory is the peak resident set (VmHWM, reset before each stage) minus the resident set when the stage
started, in bytes per model parameter: what the stage adds on top of what it was given (the model, or the scores,
or the three models to merge; "start MiB" is the resident set then, the interpreter and libraries included). Time
is the process's CPU time. A job that would not fit the memory this machine has free is skipped, with a note.

- forward+backward: the bare loop (forward, backward, drop the gradients) over the data; every ratio is to it.
- scores: `compute_scores(model, "saliency")` over the same batches, once with --batches batches and once with
  twice as many: its extra memory must not grow with the data (flat), its time per batch must not either.
- top-k: `Mask.top_k(scores, 0.5)` over one random fp32 score per parameter (global scope).
- merge: `task_vectors` + `task_arithmetic` (safeedit.merge) of two task models over the base, all in memory.
- AdamW step, unmasked and masked: two steps of the unlearning loop's step (forward, backward, clipping, the loop's
  fused AdamW, weight decay 0) on the first batch, without and under `masked_training` with a 50% random mask
  (each in its own process); the extra memory is gradients, optimizer state and, masked, the mask and the saved
  masked-out bits; the masked row's ratio is to the unmasked step.
Ratios of top-k and merge are to one batch of the bare loop. The machine's load inflates CPU times less than wall
times, but a shared machine still makes them upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import SIZES, forward_backward, parameter_count, peak_memory, random_llama, timed, token_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU = torch.device("cpu")
RATIO = 0.5
MMAP_THRESHOLD = str(128 * 1024)


def _held(params: int) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss * 1024 / params


def job_score(args: argparse.Namespace) -> dict:
    """Bare forward+backward, then saliency scoring, over the same `--batches` batches of one model."""
    from safeedit import compute_scores

    model = random_llama(args.size, DTYPES[args.dtype], CPU)
    params = sum(p.numel() for p in model.parameters())
    batches = token_batches(args.batches, args.batch_size, args.length, model.config.vocab_size, CPU)
    forward_backward(model, batches[:1])  # warm-up
    held = _held(params)
    with peak_memory(CPU) as bare_memory:
        bare_seconds, _ = timed(CPU, lambda: forward_backward(model, batches))
    with peak_memory(CPU) as score_memory:
        score_seconds, _scores = timed(CPU, lambda: compute_scores(model, "saliency", {"forget": batches},
                                                                  progress=False))
    return {"params": params, "held": held, "bare_seconds": bare_seconds, "bare_extra": bare_memory.extra,
            "score_seconds": score_seconds, "score_extra": score_memory.extra}


def _state(args: argparse.Namespace, seed: int) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in random_llama(args.size, DTYPES[args.dtype], CPU, seed).named_parameters()}


def job_select(args: argparse.Namespace) -> dict:
    from safeedit import Mask

    generator = torch.Generator().manual_seed(0)
    shapes = {name: p.shape for name, p in random_llama(args.size, torch.float32, "meta").named_parameters()}
    scores = {name: torch.rand(shape, generator=generator) for name, shape in shapes.items()}
    params = sum(t.numel() for t in scores.values())
    held = _held(params)
    with peak_memory(CPU) as memory:
        seconds, mask = timed(CPU, lambda: Mask.top_k(scores, RATIO))
    assert mask.selected == round(RATIO * params)
    return {"params": params, "held": held, "seconds": seconds, "extra": memory.extra}


def job_merge(args: argparse.Namespace) -> dict:
    from safeedit.merge.baselines import task_arithmetic
    from safeedit.merge.vectors import task_vectors

    base = _state(args, 0)
    tasks = {}
    for index, task in enumerate(("a", "b"), start=1):
        generator = torch.Generator().manual_seed(index)
        tasks[task] = {name: t + 0.01 * torch.randn(t.shape, generator=generator).to(t.dtype)
                       for name, t in base.items()}
    params = sum(t.numel() for t in base.values())
    held = _held(params)
    with peak_memory(CPU) as memory:
        seconds, merged = timed(CPU, lambda: task_arithmetic(base, task_vectors(base, tasks), scale=0.3))
    assert merged.keys() == base.keys()
    return {"params": params, "held": held, "seconds": seconds, "extra": memory.extra}


def job_step(args: argparse.Namespace, masked: bool = False) -> dict:
    """Two AdamW steps as the unlearning loop takes them (the first allocates the optimizer state), optionally
    under `masked_training` with a seeded 50% random mask."""
    from measure import adamw_step

    from safeedit import Mask, compute_scores, masked_training
    from safeedit.unlearn.loop import adamw

    model = random_llama(args.size, DTYPES[args.dtype], CPU)
    params = sum(p.numel() for p in model.parameters())
    batch = token_batches(1, args.batch_size, args.length, model.config.vocab_size, CPU)[0]
    mask = Mask.top_k(compute_scores(model, "random", progress=False), RATIO) if masked else None
    held = _held(params)
    with peak_memory(CPU) as memory:
        if mask is None:
            optimizer = adamw(list(model.parameters()), 1e-5, 0.0)
            seconds, _ = timed(CPU, lambda: [adamw_step(model, optimizer, batch) for _ in range(2)])
        else:
            with masked_training(model, mask) as session:
                optimizer = adamw(session.trainable_parameters, 1e-5, 0.0)
                session.restore_after_steps_of(optimizer)
                seconds, _ = timed(CPU, lambda: [adamw_step(model, optimizer, batch) for _ in range(2)])
    return {"params": params, "held": held, "seconds": seconds, "extra": memory.extra}


JOBS = {"score": job_score, "select": job_select, "merge": job_merge, "step": job_step,
        "masked-step": lambda args: job_step(args, masked=True)}
# A job's resident set per parameter (what it holds plus its extra, from the 10M-50M runs, rounded up; scores are fp32
# whatever the model's dtype) and the interpreter with torch and transformers: a job that would not fit what this
# machine has free is skipped.
NEEDS = {"float32": {"score": 12.0, "select": 9.0, "merge": 28.0, "step": 24.0, "masked-step": 30.0},
         "bfloat16": {"score": 10.0, "select": 9.0, "merge": 15.0, "step": 14.0, "masked-step": 18.0}}
BASE_RSS = 600 << 20


def _available() -> int | None:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        return next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), None)


def fits(job: str, params: int, dtype: str) -> tuple[bool, str]:
    need = BASE_RSS + NEEDS[dtype][job] * params
    free = _available()
    if free is None or need < 0.9 * free:
        return True, ""
    return False, f"skipped: needs ~{need / (1 << 30):.0f} GiB, {free / (1 << 30):.0f} GiB free"


def spawn(job: str, size: str, args: argparse.Namespace, batches: int) -> dict:
    command = [sys.executable, __file__, "--job", job, "--sizes", size, "--batches", str(batches),
               "--batch-size", str(args.batch_size), "--length", str(args.length), "--dtype", args.dtype,
               "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job} at {size} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[scale] {size} {job} ({batches} batches): {result}", file=sys.stderr, flush=True)
    return result


def per_param(value: int | None, params: int) -> str:
    return f"{value / params:.2f}" if value is not None else "-"


def report(args: argparse.Namespace) -> str:
    lines = [f"CPU, {args.threads} thread(s), torch {torch.__version__}; random-init Llama in {args.dtype}; "
             f"batches of {args.batch_size} x {args.length} tokens; top-k ratio {RATIO}; CPU seconds; extra = peak RSS "
             "growth per parameter",
             f"{'size':>5} {'params':>13} {'stage':<24} {'CPU s':>8} {'ratio':>7} {'start MiB':>10} {'extra B/p':>10}"]
    for size in args.sizes:
        params = parameter_count(size)
        results = {}
        for job, batches in (("score", args.batches), ("score2", 2 * args.batches), ("select", 1), ("merge", 1),
                             ("step", 1), ("masked-step", 1)):
            ok, why = fits(job.rstrip("2"), params, args.dtype)
            results[job] = spawn(job.rstrip("2"), size, args, batches) if ok else {"skipped": why}
            if not ok:
                print(f"[scale] {size} {job}: {why}", file=sys.stderr, flush=True)
        rows = []  # (stage, job result, its time key, the bare time it is a ratio to, its extra-memory key)
        for job, batches in (("score", args.batches), ("score2", 2 * args.batches)):
            result = results[job]
            bare = result.get("bare_seconds")
            rows.append((f"forward+backward x{batches}", result, "bare_seconds", bare, "bare_extra"))
            rows.append((f"scores x{batches}", result, "score_seconds", bare, "score_extra"))
        one_batch = results["score"].get("bare_seconds", 0.0) / args.batches
        rows.append(("top-k (global)", results["select"], "seconds", one_batch, "extra"))
        rows.append(("merge (task arithmetic)", results["merge"], "seconds", one_batch, "extra"))
        rows.append(("AdamW step x2", results["step"], "seconds", None, "extra"))
        rows.append(("masked AdamW step x2", results["masked-step"], "seconds", results["step"].get("seconds"),
                     "extra"))
        for stage, result, time_key, bare, extra_key in rows:
            if "skipped" in result:
                lines.append(f"{size:>5} {params:>13,} {stage:<24} {result['skipped']}")
                continue
            seconds = result[time_key]
            ratio = f"{seconds / bare:.2f}" if bare else "-"
            start = f"{result['held'] * params / (1 << 20):.0f}"
            lines.append(f"{size:>5} {params:>13,} {stage:<24} {seconds:>8.2f} {ratio:>7} {start:>10} "
                         f"{per_param(result[extra_key], params):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "25M", "50M"], choices=list(SIZES))
    parser.add_argument("--batches", type=int, default=2, help="batches of the smaller data size (the other: twice)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.job:
        print(json.dumps(JOBS[args.job](argparse.Namespace(**{**vars(args), "size": args.sizes[0]}))))
        return
    for size in args.sizes:
        print(f"[scale] {size}: {parameter_count(size):,} parameters", file=sys.stderr, flush=True)
    print(report(args), flush=True)


if __name__ == "__main__":
    main()
