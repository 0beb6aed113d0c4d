"""GPU figures in one unattended command: attribution throughput, top-k selection and a masked bf16 AdamW step on a
1.1B-parameter random-init Llama (TinyLlama's shape) in bf16, with the peak memory of every stage.

    python benchmarks/gpu.py                 # CUDA device, 1.1B parameters (expected: 1-2 minutes on one H100/H200)
    python benchmarks/gpu.py --size small    # CPU, 2.4M parameters, a few seconds (the test suite's smoke test)

Stages, each against the same model and token batches:
- forward+backward: the bare loop (forward, backward, drop the gradients) every ratio is against;
- scores: `compute_scores(model, "saliency")` over the same batches (fp32 accumulators of a bf16 model); its
  throughput ratio is bare time / scoring time (target >= 0.8: attribution costs at most 25% over a bare pass);
- top-k: `Mask.top_k(scores, 0.5)`, global, over all 1.1B scores;
- AdamW step / masked AdamW step: forward, backward, clipping at norm 1, `AdamW.step()` on the bf16 weights,
  without and within `masked_training` with the 50% mask (the ratio masked / unmasked; target <= 1.05).
Timed stages are interleaved (bare and scoring, unmasked and masked) and medians reported. Peak memory per stage is
`torch.cuda.max_memory_allocated` on CUDA and the peak resident set on the CPU (see benchmarks/measure.py); "extra"
is the peak minus what was allocated when the stage started, in bytes per model parameter (at the small CPU size
the allocator's reuse dominates those columns: benchmarks/scale.py measures CPU memory). A stage that fails is
reported in its row and the others still run. Nothing is written to disk; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import (
    GiB,
    Peak,
    adamw_step,
    device_name,
    forward_backward,
    median,
    peak_memory,
    random_llama,
    timed,
    token_batches,
)

from safeedit import Mask, compute_scores
from safeedit.unlearn.masked import masked_training

# --size -> (model size, batches per pass, batch size, sequence length, repeats)
PRESETS = {"large": ("1B", 4, 4, 512, 3), "small": ("3M", 2, 2, 32, 2)}
RATIO = 0.5
TARGET_SCORE_THROUGHPUT = 0.8
TARGET_MASKED_STEP = 1.05
STAGES = ("forward+backward", "scores (saliency)", "top-k (global, 50%)", "AdamW step", "masked AdamW step")


@dataclass
class Row:
    stage: str
    seconds: float | None = None
    note: str = ""
    memory: Peak = field(default_factory=Peak)


def guarded(device: torch.device, function: Callable[[], None]) -> str:
    """Run one stage; a failure becomes a note instead of ending the run (a GPU run is minutes of lent time)."""
    try:
        function()
        return ""
    except Exception as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return f"FAILED: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def run(size: str, device: torch.device) -> tuple[list[Row], str, int]:
    """Measure every stage; return the table rows, a header and the parameter count."""
    model_size, count, batch, length, repeats = PRESETS[size]
    model = random_llama(model_size, torch.bfloat16, device)
    params = sum(p.numel() for p in model.parameters())
    batches = token_batches(count, batch, length, model.config.vocab_size, device)
    header = (f"device: {device_name(device)}\nmodel: random-init Llama {model_size}, {params:,} parameters, bfloat16; "
              f"{count} batches of {batch} x {length} tokens per pass; medians of {repeats} interleaved repeats")
    bare_row, score_row, topk_row, step_row, masked_row = rows = [Row(stage) for stage in STAGES]
    bare, scoring, unmasked, masked = [], [], [], []
    held: dict[str, object] = {}

    def attribution() -> None:
        forward_backward(model, batches[:1])  # warm-up (kernels, allocator)
        for _ in range(repeats):
            held.pop("scores", None)  # the previous repeat's scores are dropped before anything else is measured
            with peak_memory(device) as bare_row.memory:
                bare.append(timed(device, lambda: forward_backward(model, batches))[0])
            with peak_memory(device) as score_row.memory:
                seconds, held["scores"] = timed(
                    device, lambda: compute_scores(model, "saliency", {"forget": batches}, progress=False))
            scoring.append(seconds)

    failure = guarded(device, attribution)
    bare_row.seconds, score_row.seconds = median(bare) if bare else None, median(scoring) if scoring else None
    bare_row.note = "1.00 (baseline)" if bare else failure
    score_row.note = (f"{bare_row.seconds / score_row.seconds:.2f} throughput of bare (target >= "
                      f"{TARGET_SCORE_THROUGHPUT})" if bare and scoring else failure)

    def selection() -> None:
        if "scores" not in held:  # scoring failed: select from random scores, so the stage is still measured
            topk_row.note = "random scores (scoring failed); "
            held["scores"] = {n: torch.rand(p.shape, device=device) for n, p in model.named_parameters()}
        with peak_memory(device) as topk_row.memory:
            topk_row.seconds, mask = timed(device, lambda: Mask.top_k(held["scores"], RATIO))
        topk_row.note += f"{mask.selected:,} of {mask.total:,} scores"
        held["mask"] = mask

    failure = guarded(device, selection)
    topk_row.note = failure or topk_row.note
    held.pop("scores", None)
    if "mask" not in held:
        held["mask"] = Mask({n: torch.rand(p.shape, device=device) < RATIO for n, p in model.named_parameters()})

    def steps() -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        adamw_step(model, optimizer, batches[0])  # warm-up; allocates the optimizer state
        for _ in range(repeats):
            with peak_memory(device) as step_row.memory:
                unmasked.append(timed(device, lambda: adamw_step(model, optimizer, batches[0]))[0])
            # entering masked_training (saving the masked-out values) is neither timed nor measured
            with masked_training(model, held["mask"], optimizer), peak_memory(device) as masked_row.memory:
                masked.append(timed(device, lambda: adamw_step(model, optimizer, batches[0]))[0])

    failure = guarded(device, steps)
    step_row.seconds, masked_row.seconds = median(unmasked) if unmasked else None, median(masked) if masked else None
    step_row.note = "1.00 (baseline)" if unmasked else failure
    masked_row.note = (f"{masked_row.seconds / step_row.seconds:.2f}x unmasked (target <= {TARGET_MASKED_STEP})"
                       if unmasked and masked else failure)
    return rows, header, params


def table(rows: list[Row], header: str, params: int) -> str:
    lines = [header, f"{'stage':<22} {'time (ms)':>11} {'peak (GiB)':>11} {'extra (B/param)':>16}  ratio"]
    for row in rows:
        seconds = f"{row.seconds * 1e3:.1f}" if row.seconds is not None else "-"
        peak = f"{row.memory.peak / GiB:.2f}" if row.memory.peak is not None else "-"
        extra = f"{row.memory.extra / params:.2f}" if row.memory.extra is not None else "-"
        lines.append(f"{row.stage:<22} {seconds:>11} {peak:>11} {extra:>16}  {row.note}")
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
