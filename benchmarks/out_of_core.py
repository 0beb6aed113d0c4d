"""Out of core: peak memory of merges and masks in memory against streamed tensor by tensor, and the speed of the
row-scope selection against a plain `torch.sort`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/out_of_core.py                 # ~89M-parameter Llama, 2 tasks
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/out_of_core.py --hidden 256 --layers 4 --rows-only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/out_of_core.py --hidden 2048 --layers 22 --vocab 32000 \
        --stream-only                                           # ~1.3B parameters: streamed steps only (~21 GB disk)

A random-init Llama (fp32, save_pretrained in 100 MB shards) and two perturbed copies are written to a temporary
folder; each measured step runs in its own process, whose peak resident memory (VmHWM) is reported, next to
that of a process that only imports the same modules (the interpreter, torch and transformers). Steps: `safeedit
merge` TIES and DARE, in memory and with `--stream`; the global magnitude top-1% mask in memory (every tensor
loaded, `Mask.top_k`, `Mask.save`) and streamed (`safeedit.streaming.checkpoint_mask`); the Wanda top-1% mask (2
calibration batches of 4 x 64 random tokens) of the model loaded whole in fp32 and streamed (decoder layers
offloaded to disk by accelerate, one in memory at a time). Row scope: the median of
repeated `_select_rows` on a 4096x4096 score tensor against `torch.sort` of the same tensor, at one thread.
Prints a table; writes nothing outside its temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import sys, time
import torch, transformers
import safeedit.cli, safeedit.streaming, safeedit.merge.streaming
from safeedit.masks import Mask
from safeedit.checkpoint import Checkpoint
step, args = sys.argv[1], sys.argv[2:]
start = time.process_time()
if step == "merge":
    assert safeedit.cli.main(["merge", *args]) == 0
elif step == "mask-memory":
    from safeedit.attribution.scores import magnitude
    weights = dict(Checkpoint(args[0]).tensors())
    Mask.top_k(magnitude(weights), float(args[2])).save(args[1])
elif step == "mask-stream":
    safeedit.streaming.checkpoint_mask(args[0], args[1], float(args[2]))
elif step.startswith("wanda"):  # 2 batches of 4 x 64 random tokens, the same in both
    generator = torch.Generator().manual_seed(0)
    vocab = transformers.AutoConfig.from_pretrained(args[0]).vocab_size
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
               for ids in (torch.randint(0, vocab, (4, 64), generator=generator) for _ in range(2))]
    if step == "wanda-memory":
        from safeedit.attribution import compute_scores
        model = transformers.AutoModelForCausalLM.from_pretrained(args[0], dtype=torch.float32)
        scores = compute_scores(model, "wanda", {"calibration": batches}, progress=False)
        Mask.top_k(scores, float(args[2])).save(args[1])
    else:
        safeedit.streaming.checkpoint_mask(args[0], args[1], float(args[2]), "wanda", data={"calibration": batches},
                                           progress=False)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a parent holding a large model would
# report the parent's size (the peak of this process's own memory is VmHWM, reset by exec)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT", peak * 1024, time.process_time() - start)
"""


def measure(step: str, *args: str) -> tuple[int, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, step, *args], capture_output=True, text=True, cwd=ROOT)
    line = next((row for row in done.stdout.splitlines() if row.startswith("RESULT")), None)
    if done.returncode or line is None:
        raise SystemExit(f"{step} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    _, rss, cpu = line.split()
    return int(rss), float(cpu)


def build(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base", max_shard_size="100MB")
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
        model.save_pretrained(folder / f"task{seed}", max_shard_size="100MB")
    return sum(p.numel() for p in model.parameters())


def rows(repeats: int) -> None:
    from safeedit.masks import _select_rows

    torch.set_num_threads(1)
    scores = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(0))

    def median(run) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    sort, select = [], []
    for _ in range(3):  # interleaved, so a burst of load on a shared machine hits both
        sort.append(median(lambda: torch.sort(scores)))
        select.append(median(lambda: _select_rows(scores, 0.1)))
    s, r = statistics.median(sort), statistics.median(select)
    print(f"row scope 4096x4096, ratio 0.1, 1 thread: torch.sort {s * 1e3:.0f} ms, _select_rows {r * 1e3:.0f} ms, "
          f"ratio {r / s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows-only", action="store_true")
    parser.add_argument("--stream-only", action="store_true",
                        help="skip the in-memory steps (at 1B+ parameters in fp32 they need more than 24 GiB)")
    args = parser.parse_args()
    rows(args.repeats)
    if args.rows_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        count = build(folder, args.hidden, args.layers, args.vocab)
        size = count * 4
        imports, _ = measure("imports")
        print(f"model: {count / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB per checkpoint (fp32); 3 checkpoints; "
              f"a process importing torch, transformers and safeedit peaks at {imports / 2**20:.0f} MiB")
        print(f"{'step':34s}{'peak RSS MiB':>14s}{'minus imports':>15s}{'x checkpoint':>14s}{'CPU s':>8s}")
        models = [str(folder / name) for name in ("base", "task1", "task2")]
        steps = {
            "merge ties, in memory": ("merge", *models, "--method", "ties", "--out", str(folder / "m1")),
            "merge ties, --stream": ("merge", *models, "--method", "ties", "--stream", "--out", str(folder / "m2")),
            "merge dare, in memory": ("merge", *models, "--method", "dare", "--out", str(folder / "m3")),
            "merge dare, --stream": ("merge", *models, "--method", "dare", "--stream", "--out", str(folder / "m4")),
            "magnitude top-1% mask, in memory": ("mask-memory", models[0], str(folder / "k1.safetensors"), "0.01"),
            "magnitude top-1% mask, streamed": ("mask-stream", models[0], str(folder / "k2.safetensors"), "0.01"),
            "wanda top-1% mask, in memory": ("wanda-memory", models[0], str(folder / "k3.safetensors"), "0.01"),
            "wanda top-1% mask, streamed": ("wanda-stream", models[0], str(folder / "k4.safetensors"), "0.01"),
        }
        if args.stream_only:
            steps = {label: step for label, step in steps.items() if "in memory" not in label}
        for label, (step, *step_args) in steps.items():
            rss, cpu = measure(step, *step_args)
            print(f"{label:34s}{rss / 2**20:14.0f}{(rss - imports) / 2**20:15.0f}{(rss - imports) / size:14.2f}"
                  f"{cpu:8.1f}")


if __name__ == "__main__":
    main()
