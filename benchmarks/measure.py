"""What `benchmarks/gpu.py` and `benchmarks/scale.py` share: random-init Llama models of named sizes, token batches,
a clock and a peak-memory meter that work the same on a CUDA device and on the CPU.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` (tensors only, reset per stage); on the CPU, the process's
peak resident set (`VmHWM` in /proc/self/status, reset per stage by writing 5 to /proc/self/clear_refs, Linux >= 4.0),
so it counts everything the process touches, tensors and allocator slack alike. A stage's *extra* memory is its peak
minus what was in use when it started. Times: on CUDA, wall time after `torch.cuda.synchronize()`; on the CPU, the
process's CPU time (`time.process_time`, all threads), which a busy machine inflates less than wall time.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain checkout: safeedit need not be installed
    sys.path.insert(0, str(ROOT))

GiB = 1 << 30

# name -> (hidden, intermediate, layers, attention heads, key/value heads, vocabulary); "1B" is TinyLlama-1.1B's shape
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "3M": (128, 352, 2, 4, 2, 8000),
    "10M": (256, 704, 8, 8, 4, 8000),
    "25M": (384, 1024, 8, 8, 4, 16000),
    "50M": (512, 1408, 11, 8, 4, 16000),
    "100M": (768, 2048, 10, 12, 4, 32000),
    "300M": (1024, 2816, 20, 16, 4, 32000),
    "1B": (2048, 5632, 22, 32, 4, 32000),
}


def llama_config(size: str):
    from transformers import LlamaConfig

    if size not in SIZES:
        raise SystemExit(f"unknown model size {size!r}; choose from {', '.join(SIZES)}")
    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)


def parameter_count(size: str) -> int:
    """Parameters of a size, counted on the meta device (nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(size)).parameters())


def random_llama(size: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """A random-init Llama of `size` in eval mode, built directly on `device` and cast to `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(size))
    return model.to(dtype).eval()


def token_batches(count: int, batch: int, length: int, vocab: int, device: torch.device | str,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random token ids (labels = inputs), seeded."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (batch, length), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def forward_backward(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """The bare loop every ratio is against: forward, backward, drop the gradients."""
    for batch in batches:
        model(**batch).loss.backward()
        for p in model.parameters():
            p.grad = None


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def timed(device: torch.device, function: Callable[[], object]) -> tuple[float, object]:
    start = clock(device)
    result = function()
    return clock(device) - start, result


def adamw_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    """One training step as the unlearning loop takes it: forward, backward, clipping at norm 1, the step."""
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def median(values: list[float]) -> float:
    return statistics.median(values)


def status_kib(key: str) -> int | None:
    """A KiB field of /proc/self/status: VmRSS (resident now) or VmHWM (peak resident); None where there is none."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, writing 5 to clear_refs); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    """A stage's peak memory in bytes (None where this platform cannot tell) and its growth over the start."""

    peak: int | None = None
    extra: int | None = None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Measure the peak memory of the block (see the module docstring for what is counted on each device)."""
    result = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device)
        result.extra = result.peak - start
        return
    start = status_kib("VmRSS")
    resettable = reset_peak_rss()
    yield result
    peak = status_kib("VmHWM")
    if resettable and start is not None and peak is not None:
        result.peak, result.extra = peak * 1024, (peak - start) * 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch " \
           f"{torch.__version__}"
