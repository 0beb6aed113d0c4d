"""GPU figures in one unattended command: attribution throughput, top-k selection and a masked bf16 AdamW step on a
1.1B-parameter random-init Llama (TinyLlama's shape) in bf16, with the peak memory of every stage.

    python benchmarks/gpu.py                 # CUDA device, 1.1B parameters (well under 5 minutes on one H100/H200)
    python benchmarks/gpu.py --size small    # CPU, 2.4M parameters, a few seconds (the test suite's smoke test)

Stages, each against the same model and token batches:
- forward+backward: the bare loop (forward, backward, drop the gradients) every ratio is against;
- scores: `compute_scores(model, "saliency")` over the same batches (fp32 accumulators of a bf16 model); its
  throughput ratio is bare time / scoring time (target >= 0.8: attribution costs at most 25% over a bare pass);
- top-k: `Mask.top_k(scores, 0.5)`, global, over all 1.1B scores;
- AdamW step / masked AdamW step: forward, backward, `AdamW.step()` on the bf16 weights, without and within
  `masked_training` with the 50% mask (the ratio masked / unmasked; target <= 1.05).
Timed stages are interleaved (bare and scoring, unmasked and masked) and medians reported. Peak memory per stage is
`torch.cuda.max_memory_allocated` on CUDA and the peak resident set on the CPU (see benchmarks/measure.py); "extra"
is the peak minus what was allocated when the stage started, in bytes per model parameter. Nothing is written to
disk; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import GiB, device_name, forward_backward, median, peak_memory, random_llama, timed, token_batches

from safeedit import Mask, compute_scores
from safeedit.unlearn.masked import masked_training

# --size -> (model size, batches per pass, batch size, sequence length, repeats)
PRESETS = {"large": ("1B", 4, 4, 512, 3), "small": ("3M", 2, 2, 32, 2)}
RATIO = 0.5
TARGET_SCORE_THROUGHPUT = 0.8
TARGET_MASKED_STEP = 1.05
STAGES = ("forward+backward", "scores (saliency)", "top-k (global, 50%)", "AdamW step", "masked AdamW step")


def adamw_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(size: str, device: torch.device) -> tuple[list[tuple], str]:
    """Measure every stage; return the table rows (stage, seconds, ratio text, peak bytes, extra bytes) and a header."""
    model_size, count, batch, length, repeats = PRESETS[size]
    model = random_llama(model_size, torch.bfloat16, device)
    params = sum(p.numel() for p in model.parameters())
    batches = token_batches(count, batch, length, model.config.vocab_size, device)
    header = (f"device: {device_name(device)}\nmodel: random-init Llama {model_size}, {params:,} parameters, bfloat16; "
              f"{count} batches of {batch} x {length} tokens per pass; medians of {repeats} interleaved repeats")

    def score() -> dict:
        return compute_scores(model, "saliency", {"forget": batches}, progress=False)

    forward_backward(model, batches[:1])  # warm-up (kernels, allocator)
    bare, scoring, memory, scores = [], [], {}, {}
    for _ in range(repeats):
        scores = {}  # the previous repeat's scores are dropped before anything else is measured
        with peak_memory(device) as memory["bare"]:
            bare.append(timed(device, lambda: forward_backward(model, batches))[0])
        with peak_memory(device) as memory["scores"]:
            seconds, scores = timed(device, score)
        scoring.append(seconds)
    with peak_memory(device) as memory["top-k"]:
        topk_seconds, mask = timed(device, lambda: Mask.top_k(scores, RATIO))
    selected, total = mask.selected, mask.total
    scores = {}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = batches[0]
    adamw_step(model, optimizer, step)  # warm-up; allocates the optimizer state
    unmasked, masked = [], []
    for _ in range(repeats):
        with peak_memory(device) as memory["step"]:
            unmasked.append(timed(device, lambda: adamw_step(model, optimizer, step))[0])
        # entering masked_training (saving the masked-out values) is not timed, nor measured
        with masked_training(model, mask, optimizer), peak_memory(device) as memory["masked"]:
            masked.append(timed(device, lambda: adamw_step(model, optimizer, step))[0])

    bare_s, score_s = median(bare), median(scoring)
    step_s, masked_s = median(unmasked), median(masked)
    rows = [
        (STAGES[0], bare_s, "1.00 (baseline)", memory["bare"]),
        (STAGES[1], score_s, f"{bare_s / score_s:.2f} throughput of bare (target >= {TARGET_SCORE_THROUGHPUT})",
         memory["scores"]),
        (STAGES[2], topk_seconds, f"{selected:,} of {total:,} scores", memory["top-k"]),
        (STAGES[3], step_s, "1.00 (baseline)", memory["step"]),
        (STAGES[4], masked_s, f"{masked_s / step_s:.2f}x unmasked (target <= {TARGET_MASKED_STEP})",
         memory["masked"]),
    ]
    return [(stage, seconds, ratio, peak.peak, peak.extra, params) for stage, seconds, ratio, peak in rows], header


def table(rows: list[tuple], header: str) -> str:
    lines = [header, f"{'stage':<22} {'time (ms)':>11} {'peak (GiB)':>11} {'extra (B/param)':>16}  ratio"]
    for stage, seconds, ratio, peak, extra, params in rows:
        peak_text = f"{peak / GiB:.2f}" if peak is not None else "-"
        extra_text = f"{extra / params:.2f}" if extra is not None else "-"
        lines.append(f"{stage:<22} {seconds * 1e3:>11.1f} {peak_text:>11} {extra_text:>16}  {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="large",
                        help="large: 1.1B parameters on CUDA (the default); small: 2.4M parameters on the CPU")
    parser.add_argument("--device", default=None, help="override the device (default: cuda for large, cpu for small)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if args.size == "large" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run `python benchmarks/gpu.py --size small` for the CPU smoke run")
    torch.manual_seed(0)
    text = table(*run(args.size, device))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
