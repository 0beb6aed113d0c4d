"""Benchmark: attribution overhead of `compute_scores` and global top-k selection of `Mask.top_k`.

Run from the repository root:

    .venv/bin/python benchmarks/attribution.py            # full run (~100M scores for top-k)
    .venv/bin/python benchmarks/attribution.py --quick    # smoke run (~10M scores, fewer repeats)

Part 1 times `compute_scores(model, "saliency", ...)` against a bare forward/backward loop over the same
pre-generated batches (a small CNN classifier and a tiny Llama causal LM), interleaving the two and reporting
medians. Part 2 runs `Mask.top_k(scope="global")` and the reference SalUn selection (concatenate, argsort,
argsort) over the same seeded scores, each in a fresh subprocess, and reports wall time and extra peak memory
(ru_maxrss after selection minus the RSS right before it). Part 3 times an
AdamW step (forward, backward, clipping, step) under `masked_training` with a 50% random mask against an unmasked
step on an identical random Llama, in CPU time, interleaved: torch's default AdamW and the fused one, each with
weight decay 0 and 0.01. Every ratio is ours / baseline from this same run.

    .venv/bin/python benchmarks/attribution.py --only-masked-step   # part 3 alone (~27M parameters)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from measure import adamw_step, reset_peak_rss, status_kib  # benchmarks/measure.py, next to this script
from torch import nn

import safeedit
from safeedit import Mask, compute_scores
from safeedit.masks import target_count

SEED = 0
TARGET_ATTRIBUTION_RATIO = 1.10  # ours / bare loop, wall time
TARGET_TOPK_TIME_RATIO = 0.5  # ours / reference, wall time
TARGET_TOPK_MEMORY_RATIO = 0.10  # ours / reference, extra peak memory
TOPK_TARGET_SIZE = 100_000_000  # the top-k memory target is judged at this many scores or more
TARGET_MASKED_STEP_RATIO = 1.05  # masked AdamW step / unmasked step, CPU time
MiB = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (`measure.status_kib`), which these measurements cannot do without."""
    value = status_kib(field)
    if value is None:
        raise RuntimeError(f"{field} not found in /proc/self/status")
    return value


def max_rss_kib() -> int:
    """ru_maxrss in KiB (Linux): the peak resident set size of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def total_ram_gib() -> float:
    """Installed memory from /proc/meminfo, in GiB."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def fmt_mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n_bytes / MiB:,.1f} MiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Plain-text table with left-aligned first column and right-aligned others."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts)

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


# ----------------------------------------------------------------------------------------------------------
# part 1: attribution overhead
# ----------------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """3 conv layers and a 2-layer head for 28x28 single-channel images (about 240k parameters)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape [batch, classes]."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 -> 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 14 -> 7
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 7 -> 3
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def cnn_workload(n_batches: int) -> tuple[nn.Module, list[Any], Callable[[nn.Module, Any], torch.Tensor]]:
    """The CNN, its (x, y) batches (128 images of 28x28) and the bare loss."""
    torch.manual_seed(SEED)
    model = SmallCNN()
    generator = torch.Generator().manual_seed(SEED)
    batches = [
        (torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,), generator=generator))
        for _ in range(n_batches)
    ]

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return model, batches, loss


def lm_workload(n_batches: int) -> tuple[nn.Module, list[Any], Callable[[nn.Module, Any], torch.Tensor]]:
    """A tiny LlamaForCausalLM, its token batches ([8, 64] dicts with labels) and the bare loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, config.vocab_size, (8, 64), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return model(**batch).loss

    return model, batches, loss


def bare_loop(model: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
    """The baseline: forward and backward over every batch, nothing kept."""
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)


def ours(model: nn.Module, batches: list[Any]) -> dict[str, torch.Tensor]:
    """safeedit's saliency scores over the same batches."""
    return compute_scores(model, "saliency", {"forget": batches}, progress=False)


def check_scores(model: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> float:
    """Max |ours − hand-computed |Σ grad|| over a few batches, so the timed work is known to be the real thing."""
    few = batches[:3]
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in few:
        loss_fn(model, batch).backward()  # .grad accumulates the sum
    expected = {name: p.grad.detach().abs() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = ours(model, few)
    return max(float((got[name] - expected[name]).abs().max()) for name in expected)


def time_call(fn: Callable[[], Any]) -> float:
    """Wall time of one call, in seconds."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def attribution_case(name: str, workload: tuple, repeats: int) -> dict[str, Any]:
    """Warm up, then time bare loop and compute_scores interleaved (order alternating each repeat)."""
    model, batches, loss_fn = workload
    n_params = sum(p.numel() for p in model.parameters())
    max_diff = check_scores(model, batches, loss_fn)
    run_base = functools.partial(bare_loop, model, batches, loss_fn)
    run_ours = functools.partial(ours, model, batches)
    run_base()
    run_ours()
    base_times, our_times = [], []
    for rep in range(repeats):
        order = [(run_base, base_times), (run_ours, our_times)]
        for fn, sink in order if rep % 2 == 0 else reversed(order):
            sink.append(time_call(fn))
    base, our = statistics.median(base_times), statistics.median(our_times)
    return {
        "name": name,
        "params": n_params,
        "batches": len(batches),
        "base": base,
        "ours": our,
        "ratio": our / base,
        "base_spread": (min(base_times), max(base_times)),
        "ours_spread": (min(our_times), max(our_times)),
        "max_diff": max_diff,
    }


def part_attribution(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run both attribution cases and print their table."""
    print("\n== Part 1: attribution overhead (compute_scores 'saliency' vs bare forward/backward loop) ==")
    results = [
        attribution_case("cnn 28x28 b128", cnn_workload(args.cnn_batches), args.repeats),
        attribution_case("llama tiny [8,64]", lm_workload(args.lm_batches), args.repeats),
    ]
    rows = []
    for r in results:
        rows.append([
            r["name"],
            f"{r['params']:,}",
            str(r["batches"]),
            f"{r['base'] * 1e3:,.1f} ms",
            f"{r['ours'] * 1e3:,.1f} ms",
            f"{r['ratio']:.3f}",
            f"{r['ours_spread'][0] / r['base_spread'][0]:.3f}",
            f"{r['base_spread'][0] * 1e3:,.0f}-{r['base_spread'][1] * 1e3:,.0f}",
            f"{r['ours_spread'][0] * 1e3:,.0f}-{r['ours_spread'][1] * 1e3:,.0f}",
            f"{r['max_diff']:.1e}",
        ])
    print(f"median of {args.repeats} interleaved repeats after one warm-up each")
    print_table(
        ["model", "params", "batches", "bare loop", "ours", "ours/bare", "min/min", "bare min-max",
         "ours min-max", "score check"],
        rows,
    )
    print("ours/bare: ratio of medians (the target); min/min: ratio of the fastest runs, less sensitive to other "
          "load; score check: max |ours - |sum of .grad|| over 3 batches (should be ~0)")
    return results


# ----------------------------------------------------------------------------------------------------------
# part 2: global top-k selection
# ----------------------------------------------------------------------------------------------------------


def score_shapes(total: int) -> dict[str, tuple[int, ...]]:
    """20 tensors of very different sizes summing to exactly `total` entries (2-D [rows, 1000] when large)."""
    weights = [16, 1, 9, 0.01, 4, 12, 0.002, 7, 3, 5, 0.5, 11, 2, 6, 0.05, 8, 10, 1.5, 0.2, 13]
    cols = 1000
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights[:-1]]
    sizes = [size - size % cols if size >= 100 * cols else size for size in sizes]
    sizes.append(total - sum(sizes))  # the last one takes the remainder, 1-D, so the total is exact
    shapes: dict[str, tuple[int, ...]] = {}
    for i, size in enumerate(sizes):
        large = size >= 100 * cols and size % cols == 0
        shapes[f"layer{i:02d}.weight"] = (size // cols, cols) if large else (size,)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == total
    return shapes


def make_scores(total: int, ratio: float) -> dict[str, torch.Tensor]:
    """Seeded float32 scores: torch.rand drawn in float64, shifted by −(1 − ratio), stored as float32.

    The shift puts the selection threshold near 0, where float32 is finest, so no two scores tie at the
    threshold and the reference's unstable argsort selects exactly the same entries as ours. (Plain float32
    torch.rand has only 2^24 levels: at 100M scores each value occurs ~6 times and the threshold is tied.)
    Filled in 1M-element chunks so no large temporary raises the peak RSS before the measurement starts.
    """
    generator = torch.Generator().manual_seed(SEED)
    scores = {}
    for name, shape in score_shapes(total).items():
        tensor = torch.empty(shape, dtype=torch.float32)
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), 1 << 20):
            end = min(flat.numel(), start + (1 << 20))
            flat[start:end] = torch.rand(end - start, dtype=torch.float64, generator=generator).sub_(1 - ratio)
        scores[name] = tensor
    return scores


def reference_top_k(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The public SalUn way: concatenate, argsort, argsort again for ranks, threshold the ranks per tensor."""
    all_elements = torch.cat([t.flatten() for t in scores.values()])
    # SalUn writes int(len(all_elements) * (1 - ratio)); total − k makes it select exactly k = round(ratio·total)
    threshold_index = len(all_elements) - target_count(ratio, len(all_elements))
    positions = torch.argsort(all_elements)
    ranks = torch.argsort(positions)
    masks = {}
    start = 0
    for name, tensor in scores.items():
        n = tensor.numel()
        masks[name] = ranks[start : start + n].reshape(tensor.shape) >= threshold_index
        start += n
    return masks


def our_top_k(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """safeedit's global top-k."""
    return Mask.top_k(scores, ratio, scope="global").tensors


def topk_worker(variant: str, total: int, ratio: float, threads: int, verify: bool) -> dict[str, Any]:
    """Body of one fresh subprocess: allocate scores, measure one selection's time and extra peak RSS."""
    torch.set_num_threads(threads)
    scores = make_scores(total, ratio)
    gc.collect()
    rss_before, hwm_before, max_before = proc_status_kib("VmRSS"), proc_status_kib("VmHWM"), max_rss_kib()
    reset = reset_peak_rss()
    select = our_top_k if variant == "ours" else reference_top_k
    start = time.perf_counter()
    masks = select(scores, ratio)
    seconds = time.perf_counter() - start
    hwm_after, max_after = proc_status_kib("VmHWM"), max_rss_kib()
    result: dict[str, Any] = {
        "variant": variant,
        "seconds": seconds,
        "rss_before_kib": rss_before,
        "slack_kib": max(max_before, hwm_before) - rss_before,  # peak already above RSS before selecting (want ~0)
        "extra_kib": max_after - rss_before,  # the measurement: ru_maxrss high-water mark minus RSS before
        "extra_hwm_kib": hwm_after - rss_before if reset else None,  # cross-check: VmHWM reset just before
        "selected": int(sum(int(m.sum()) for m in masks.values())),
        "mask_bytes": sum(m.numel() * m.element_size() for m in masks.values()),
    }
    if verify:  # after the measurement: run the other variant and compare entry for entry
        other = (reference_top_k if variant == "ours" else our_top_k)(scores, ratio)
        result["identical"] = all(torch.equal(masks[name], other[name]) for name in scores)
        result["other_selected"] = int(sum(int(m.sum()) for m in other.values()))
        threshold = min(float(scores[name][masks[name]].min()) for name in scores if masks[name].any())
        result["ties_at_threshold"] = int(sum(int((t == threshold).sum()) for t in scores.values()))
    return result


def run_worker(variant: str, args: argparse.Namespace, verify: bool) -> dict[str, Any]:
    """Run `topk_worker` in a fresh interpreter (this script with a hidden flag) and parse its JSON line.

    Started through /bin/sh, so the worker is a grandchild: Linux carries ru_maxrss across execve, and a direct
    child of this (by then large) process would start with this process's RSS as its high-water mark.
    """
    command = [
        "/bin/sh", "-c", '"$@"; exit $?', "sh",
        sys.executable, os.path.abspath(__file__), "--_worker", variant, "--topk-size", str(args.topk_size),
        "--ratio", repr(args.ratio), "--threads", str(args.threads),
    ]
    if verify:
        command.append("--_verify")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"top-k worker {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_topk(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved fresh-process runs of both selections; print their table."""
    total = args.topk_size
    k = target_count(args.ratio, total)
    n_tensors = len(score_shapes(total))
    print(f"\n== Part 2: global top-k over {total:,} float32 scores in {n_tensors} tensors, ratio {args.ratio} "
          f"(k = {k:,}) ==")
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "ours": []}
    for rep in range(args.topk_repeats):
        order = ["reference", "ours"] if rep % 2 == 0 else ["ours", "reference"]
        for variant in order:
            runs[variant].append(run_worker(variant, args, verify=(rep == 0 and variant == "reference")))
    check = runs["reference"][0]
    summary: dict[str, Any] = {"k": k, "total": total, "identical": check["identical"],
                               "ties": check["ties_at_threshold"]}
    rows = []
    for variant in ("reference", "ours"):
        seconds = statistics.median(r["seconds"] for r in runs[variant])
        extra = statistics.median(r["extra_kib"] for r in runs[variant]) * 1024
        hwm = [r["extra_hwm_kib"] for r in runs[variant] if r["extra_hwm_kib"] is not None]
        summary[variant] = {"seconds": seconds, "extra": extra}
        rows.append([
            variant,
            f"{seconds:,.2f} s",
            ", ".join(f"{r['seconds']:.2f}" for r in runs[variant]),
            fmt_mib(extra),
            f"{extra / total:.2f}",
            fmt_mib(statistics.median(hwm) * 1024) if hwm else "n/a",
            fmt_mib(runs[variant][0]["mask_bytes"]),
            f"{max(r['slack_kib'] for r in runs[variant]) / 1024:.1f}",
            f"{runs[variant][0]['selected']:,}",
        ])
    print(f"each run in a fresh subprocess, interleaved; median of {args.topk_repeats}")
    print_table(
        ["variant", "time", "runs (s)", "extra peak", "B/score", "VmHWM check", "mask output", "slack MiB",
         "selected"],
        rows,
    )
    print("extra peak = ru_maxrss after selection - VmRSS right after allocating the scores; VmHWM check: the same "
          "from VmHWM reset just before selecting; slack: peak already above RSS before selecting (want ~0)")
    print(f"scores themselves: {fmt_mib(4 * total)} (4 B/score), allocated before the measurement; "
          f"RSS before selection: {fmt_mib(runs['ours'][0]['rss_before_kib'] * 1024)}")
    print("extra peak includes the mask output (1 B/score bool) for both; "
          f"without it: reference {(summary['reference']['extra'] - 1.0 * total) / total:.2f} B/score, "
          f"ours {(summary['ours']['extra'] - 1.0 * total) / total:.2f} B/score")
    print(f"identical masks: {'yes' if check['identical'] else 'no'} "
          f"(reference selected {check['selected']:,}, ours {check['other_selected']:,}, k = {k:,}; "
          f"scores equal to the threshold value: {check['ties_at_threshold']})")
    return summary


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# part 3: masked optimizer step
# ----------------------------------------------------------------------------------------------------------


def step_workload(quick: bool) -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]:
    """A random-init Llama (about 27M parameters; --quick: about 1.6M) and one token batch [4, 128]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, vocab_size=4000) if quick else \
        dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, vocab_size=8000)
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128, **size)

    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return LlamaForCausalLM(config).train()

    ids = torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(SEED))
    return build, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def masked_step_case(args: argparse.Namespace, fused: bool, weight_decay: float) -> dict[str, Any]:
    """CPU time of an AdamW step under `masked_training` (a seeded random mask over every weight, --step-ratio of
    them in) against an unmasked AdamW step on an identical copy; `args.step_repeats` interleaved repeats of
    `args.step_steps` steps each (order alternating), after one warm-up step each. Masked-out weights are checked
    bit-identical after the last step, inside the block. With weight decay 0 the masked-out weights are not written
    back after each step (the optimizer cannot move them, see `masked_training`); with weight decay they are."""
    from safeedit import masked_training
    from safeedit.unlearn.masked import bits

    build, batch = step_workload(args.quick)
    plain, masked = build(), build()
    generator = torch.Generator().manual_seed(SEED)
    mask = Mask({name: torch.rand(p.shape, generator=generator) < args.step_ratio
                 for name, p in masked.named_parameters()})
    before = {name: p.detach().clone() for name, p in masked.named_parameters()}
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=weight_decay, fused=fused)
    plain_times, masked_times = [], []
    with masked_training(masked, mask) as session:
        masked_optimizer = torch.optim.AdamW(session.trainable_parameters, lr=1e-4, weight_decay=weight_decay,
                                              fused=fused)
        session.restore_after_steps_of(masked_optimizer)
        runs = [(lambda: adamw_step(plain, plain_optimizer, batch), plain_times),
                (lambda: adamw_step(masked, masked_optimizer, batch), masked_times)]
        for run, _ in runs:
            run()  # warm-up: optimizer state allocated
        for rep in range(args.step_repeats):
            for run, sink in runs if rep % 2 == 0 else reversed(runs):
                gc.collect()
                start = time.process_time()
                for _ in range(args.step_steps):
                    run()
                sink.append((time.process_time() - start) / args.step_steps)
        identical = all(torch.equal(bits(p.detach())[~mask.tensors[name]], bits(before[name])[~mask.tensors[name]])
                        for name, p in masked.named_parameters())  # before the block's exit restores them
    base, ours_ = statistics.median(plain_times), statistics.median(masked_times)
    return {"optimizer": f"AdamW {'fused' if fused else '(default)'}, weight decay {weight_decay:g}",
            "params": sum(p.numel() for p in plain.parameters()), "base": base, "masked": ours_,
            "ratio": ours_ / base, "base_spread": (min(plain_times), max(plain_times)),
            "masked_spread": (min(masked_times), max(masked_times)), "identical": identical}


def part_masked_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part 3 with torch's default AdamW (a loop over tensors on CPU) and its fused CPU kernel, each with weight decay
    0 (LLM unlearning's setting: no restore after each step) and 0.01 (restored after each step); their table."""
    print("\n== Part 3: masked AdamW step vs unmasked step (CPU time per step) ==")
    results = [masked_step_case(args, fused, weight_decay) for weight_decay in (0.0, 0.01) for fused in (False, True)]
    print(f"random Llama, {results[0]['params']:,} parameters, batch [4, 128], mask {args.step_ratio:.0%} in; "
          f"median of {args.step_repeats} interleaved repeats of {args.step_steps} steps, CPU time (process_time) "
          "per step")
    print_table(
        ["optimizer", "unmasked step", "masked step", "masked/unmasked", "min/min", "unmasked min-max",
         "masked min-max", "masked-out identical"],
        [[r["optimizer"], f"{r['base'] * 1e3:,.1f} ms", f"{r['masked'] * 1e3:,.1f} ms", f"{r['ratio']:.3f}",
          f"{r['masked_spread'][0] / r['base_spread'][0]:.3f}",
          f"{r['base_spread'][0] * 1e3:,.0f}-{r['base_spread'][1] * 1e3:,.0f}",
          f"{r['masked_spread'][0] * 1e3:,.0f}-{r['masked_spread'][1] * 1e3:,.0f}",
          "yes" if r["identical"] else "NO"] for r in results],
    )
    print("a step: zero_grad, forward, backward, clip_grad_norm_, AdamW; masked: the optimizer holds the tensors "
          "with a masked-in entry, gradients masked in place, masked-out weights written back after each step only "
          "with weight decay (without, AdamW cannot move them; they are written back once on exit), and checked "
          "bit-identical after the last step, before that exit. The default AdamW's square root (torch.sqrt) is "
          "several times slower on zeros, the second moment of every masked-out entry; the fused kernel's is not "
          "(the unlearning loop uses the fused kernel: safeedit.unlearn.loop.adamw). CPU time counts this process "
          "only; other load on the machine still slows it (upper bounds)")
    print("load average at the end of part 3 (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick shrinks every size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10M scores, fewer batches and repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved attribution repeats (default 7)")
    parser.add_argument("--topk-size", type=int, default=None, help="number of scores (default 100M)")
    parser.add_argument("--topk-repeats", type=int, default=None, help="fresh-process runs per variant (3)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of scores selected, in (0, 1)")
    parser.add_argument("--step-ratio", type=float, default=0.5, help="share of weights masked in (part 3)")
    parser.add_argument("--step-repeats", type=int, default=None, help="interleaved masked-step repeats (7)")
    parser.add_argument("--step-steps", type=int, default=None, help="steps per masked-step repeat (3)")
    parser.add_argument("--only-masked-step", action="store_true", help="run part 3 alone")
    parser.add_argument("--_worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--_verify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.0 < args.ratio < 1.0:
        parser.error("--ratio must be in (0, 1)")
    quick = args.quick
    args.repeats = args.repeats or (3 if quick else 7)
    args.topk_size = args.topk_size or (10_000_000 if quick else 100_000_000)
    args.topk_repeats = args.topk_repeats or (1 if quick else 3)
    args.cnn_batches = 10 if quick else 30
    args.lm_batches = 10 if quick else 30
    args.step_repeats = args.step_repeats or (3 if quick else 7)
    args.step_steps = args.step_steps or (2 if quick else 3)
    return args


def verdict(value: float, target: float) -> str:
    """PASS when value is at most target."""
    return "PASS" if value <= target else "MISS"


def masked_step_rows(steps: list[dict[str, Any]]) -> list[list[str]]:
    """Part 3's summary rows: the CPU ratio against its target, and the bit-identity check, per optimizer."""
    rows = []
    for step in steps:
        rows += [
            [f"masked {step['optimizer']} step / unmasked, {step['params']:,} params", f"{step['ratio']:.3f}",
             f"<= {TARGET_MASKED_STEP_RATIO:.2f}", verdict(step["ratio"], TARGET_MASKED_STEP_RATIO)],
            [f"masked {step['optimizer']} step: masked-out weights identical", "yes" if step["identical"] else "no",
             "yes", "PASS" if step["identical"] else "MISS"],
        ]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts and print the summary."""
    args = parse_args(argv)
    if args._worker:
        result = topk_worker(args._worker, args.topk_size, args.ratio, args.threads, args._verify)
        print(json.dumps(result))
        return 0
    torch.set_num_threads(args.threads)
    import transformers

    print("== safeedit benchmark: attribution overhead and global top-k ==")
    print(f"mode: {'quick' if args.quick else 'full'}; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, safeedit {safeedit.__version__}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip() +
          f", os.cpu_count()={os.cpu_count()}, usable cpus={len(os.sched_getaffinity(0))}, "
          f"RAM {total_ram_gib():.1f} GiB")
    print(f"torch.set_num_threads({args.threads}) -> torch.get_num_threads()={torch.get_num_threads()}, "
          f"interop threads={torch.get_num_interop_threads()}")
    print("load average at start (1/5/15 min): {:.2f} {:.2f} {:.2f} (other processes share these cpus)".format(
        *os.getloadavg()))
    began = time.perf_counter()

    if args.only_masked_step:
        rows = masked_step_rows(part_masked_step(args))
        print("\n== Summary ==")
        print_table(["metric", "value", "target", "result"], rows)
        return 0 if all(row[-1] != "MISS" for row in rows) else 1
    attribution = part_attribution(args)
    topk = part_topk(args)
    step = part_masked_step(args)

    time_ratio = topk["ours"]["seconds"] / topk["reference"]["seconds"]
    memory_ratio = topk["ours"]["extra"] / topk["reference"]["extra"]
    rows = [
        [f"attribution time ours/bare, {r['name']}", f"{r['ratio']:.3f}", f"<= {TARGET_ATTRIBUTION_RATIO:.2f}",
         verdict(r["ratio"], TARGET_ATTRIBUTION_RATIO)]
        for r in attribution
    ]
    rows += [
        [f"top-k time ours/reference, {topk['total']:,} scores", f"{time_ratio:.3f}",
         f"<= {TARGET_TOPK_TIME_RATIO:.2f}", verdict(time_ratio, TARGET_TOPK_TIME_RATIO)],
        [f"top-k extra peak memory ours/reference, {topk['total']:,} scores", f"{memory_ratio:.3f}",
         f"<= {TARGET_TOPK_MEMORY_RATIO:.2f}",
         verdict(memory_ratio, TARGET_TOPK_MEMORY_RATIO) if topk["total"] >= TOPK_TARGET_SIZE else "info"],
        ["top-k identical masks", "yes" if topk["identical"] else "no", "yes",
         "PASS" if topk["identical"] else "MISS"],
        *masked_step_rows(step),
    ]
    print("\n== Summary ==")
    print_table(["metric", "value", "target", "result"], rows)
    if topk["total"] < TOPK_TARGET_SIZE:
        print(f"info: the memory target is set for >= {TOPK_TARGET_SIZE:,} scores; ours has a fixed cost of a few "
              "chunk-sized buffers, so at smaller sizes the ratio is reported but not judged")
    print(f"total benchmark time: {time.perf_counter() - began:,.0f} s; "
          "load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0 if all(row[-1] != "MISS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
