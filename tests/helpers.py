"""Tiny models, data and independent reference computations shared by the tests.

Everything here is a plain function (no pytest machinery) so that processes spawned by the distributed test can
import it too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# --- tiny models ----------------------------------------------------------------------------------------------


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def make_cnn(seed: int = 0) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear on 1x6x6 inputs; BN and dropout make train/eval differ."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    )
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


# --- chat tokenizers ------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def word_chat_tokenizer(words, template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer (one id per whitespace-separated word, <unk> otherwise) with a ChatML-like template;
    ids 0-3 are <pad>, <unk>, <|im_start|>, <|im_end|> (end of turn = eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate([*specials, "user", "assistant", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    tokenizer.chat_template = template
    return tokenizer


# --- tiny data ------------------------------------------------------------------------------------------------


def classification_batches(
    n_batches: int,
    batch_size: int = 4,
    shape: tuple[int, ...] = (6,),
    classes: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((batch_size, *shape), generator=generator).to(dtype),
            torch.randint(0, classes, (batch_size,), generator=generator),
        )
        for _ in range(n_batches)
    ]


def token_batches(
    n_batches: int, lengths: Iterable[int], vocab: int, max_len: int | None = None, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded causal-LM batches (input_ids, attention_mask, labels with -100 on padding)."""
    lengths = list(lengths)
    max_len = max_len or max(lengths)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (len(lengths), max_len), generator=generator)
        attention = torch.zeros(len(lengths), max_len, dtype=torch.long)
        for row, length in enumerate(lengths):
            attention[row, :length] = 1
        ids = ids.masked_fill(attention == 0, 0)
        labels = ids.masked_fill(attention == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return batches


# --- independent references (plain autograd, no safeedit code) -------------------------------------------------


def pair_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return model(**batch).loss
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def per_batch_gradients(
    model: nn.Module, batches: Iterable, names: Iterable[str] | None = None, loss: Callable = pair_loss
) -> list[dict[str, torch.Tensor]]:
    """fp32 copies of ∇θ ℓ(batch) for every batch, on a deep copy of the model in eval mode."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    names = list(names) if names is not None else list(params)
    for p in params.values():
        p.requires_grad_(True)
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss(model, batch), [params[n] for n in names], allow_unused=True)
        out.append(
            {
                n: (g.float() if g is not None else torch.zeros(params[n].shape))
                for n, g in zip(names, grads, strict=True)
            }
        )
    return out


def gradient_sum(model, batches, names=None, loss=pair_loss) -> dict[str, torch.Tensor]:
    per_batch = per_batch_gradients(model, batches, names, loss)
    return {n: torch.stack([g[n] for g in per_batch]).sum(0) for n in per_batch[0]}


def squared_gradient_sum(model, batches, names=None, loss=pair_loss) -> dict[str, torch.Tensor]:
    per_batch = per_batch_gradients(model, batches, names, loss)
    return {n: torch.stack([g[n].square() for g in per_batch]).sum(0) for n in per_batch[0]}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight name -> nn.Linear or GPT-2 Conv1D module, for parameters that are not tied duplicates."""
    from transformers.pytorch_utils import Conv1D

    names = {id(p): n for n, p in model.named_parameters()}
    layers = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear | Conv1D) and names.get(id(module.weight)) == f"{module_name}.weight":
            layers[f"{module_name}.weight"] = module
    return layers


def wanda_reference(model: nn.Module, batches: Iterable, exclude_padding: bool = True) -> dict[str, torch.Tensor]:
    """s_ij = |W_ij| · ‖X_j‖₂, X the inputs each linear layer receives over all (non-padding) tokens."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model).eval()
    layers = linear_layers(model)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    current_mask: list[torch.Tensor | None] = [None]

    def capture(name):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            mask = current_mask[0]
            if exclude_padding and mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask.bool()]  # keep the real tokens only
            captured[name].append(x.reshape(-1, x.shape[-1]))

        return hook

    handles = [module.register_forward_pre_hook(capture(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    current_mask[0] = batch.get("attention_mask")
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                else:
                    current_mask[0] = None
                    model(batch[0])
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for name, module in layers.items():
        tokens = torch.cat(captured[name])
        norm = tokens.square().sum(0).sqrt()  # ‖X_j‖₂ per input feature j
        weight = module.weight.detach().float().abs()
        scores[name] = weight * (norm[:, None] if isinstance(module, Conv1D) else norm[None, :])
    return scores


# --- masks: brute-force reference ------------------------------------------------------------------------------


def target_count(ratio: float, total: int) -> int:
    """round(ratio · total) with halves rounded up (independent of safeedit.masks.target_count)."""
    return math.floor(ratio * total + 0.5)


def brute_force_top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Top k over all tensors by a stable sort on (−score, name order, flat index): ties go to the earlier name,
    then to the lower flat index. Scores compare as Python floats, so −0.0 and +0.0 are equal (a tie)."""
    names = sorted(scores)
    entries = [
        (-float(value), rank, index)
        for rank, name in enumerate(names)
        for index, value in enumerate(scores[name].reshape(-1).tolist())
    ]
    order = sorted(range(len(entries)), key=lambda i: entries[i])
    masks = {name: torch.zeros(scores[name].numel(), dtype=torch.bool) for name in names}
    for i in order[:k]:
        _, rank, index = entries[i]
        masks[names[rank]][index] = True
    return {name: masks[name].view(scores[name].shape) for name in scores}


def brute_force_rows(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    rows = scores.reshape(1, -1) if scores.dim() < 2 else scores.reshape(scores.shape[0], -1)
    k = target_count(ratio, rows.shape[1])
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for r, row in enumerate(rows.tolist()):
        for index in sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]:
            out[r, index] = True
    return out.view(scores.shape)


# --- state snapshots -------------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything compute_scores promises to leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), f"{key} changed"
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, grad in before["grad"].items():
        assert after["grad"][name] is grad, f"{name}.grad object replaced"
        if grad is not None:
            assert torch.equal(after["grad_values"][name], before["grad_values"][name]), f"{name}.grad changed"


# --- distributed: the same cases computed in one process and across processes -------------------------------------


class _Stream(torch.utils.data.IterableDataset):
    """An iterable (streaming) dataset, as `datasets` streaming mode gives."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self):
        return iter(zip(self.inputs, self.targets, strict=True))


def _examples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def distributed_case(name: str):
    """(model, score, data, options) for a named case; built identically in any process."""
    from torch.utils.data import DataLoader, TensorDataset

    model = make_mlp(seed=0)
    five = classification_batches(5, seed=1)  # odd: rank 0 gets three batches, rank 1 two
    three = classification_batches(3, seed=2)
    if name == "saliency_list":
        return model, "saliency", {"forget": five}, None
    if name == "fisher_list":
        return model, "fisher", {"data": five}, None
    if name == "wagle_list":
        return model, "wagle", {"forget": five, "retain": three}, {"gamma": 0.5}
    if name == "wanda_list":
        return model, "wanda", {"calibration": five}, None
    if name == "saliency_one_batch":  # rank 1 sees no batch at all
        return model, "saliency", {"forget": five[:1]}, None
    if name in ("saliency_loader", "fisher_loader"):  # 18 examples in batches of 4: five batches, the last of 2
        loader = DataLoader(TensorDataset(*_examples(18, seed=3)), batch_size=4)
        return model, name.split("_")[0], {"forget" if name.startswith("saliency") else "data": loader}, None
    if name == "fisher_loader_drop_last":  # 22 examples, drop_last: five full batches
        loader = DataLoader(TensorDataset(*_examples(22, seed=4)), batch_size=4, drop_last=True)
        return model, "fisher", {"data": loader}, None
    if name == "saliency_iterable_loader":
        loader = DataLoader(_Stream(*_examples(18, seed=5)), batch_size=4)
        return model, "saliency", {"forget": loader}, None
    if name == "wanda_gpt2_padded":
        return make_gpt2(seed=0), "wanda", {"calibration": token_batches(3, [6, 2], vocab=50, seed=6)}, None
    raise AssertionError(name)


DISTRIBUTED_CASES = [
    "saliency_list",
    "fisher_list",
    "wagle_list",
    "wanda_list",
    "saliency_one_batch",
    "saliency_loader",
    "fisher_loader",
    "fisher_loader_drop_last",
    "saliency_iterable_loader",
    "wanda_gpt2_padded",
]


def run_case(name: str) -> dict[str, torch.Tensor]:
    from safeedit import compute_scores

    model, score, data, options = distributed_case(name)
    return compute_scores(model, score, data, options=options, progress=False)


def distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Entry point of each spawned process: compute every case, save the scores and any error per case."""
    run_cases_in_process_group(rank, world, init_file, out_dir,
                               {case: (lambda c=case: run_case(c)) for case in DISTRIBUTED_CASES})


def run_cases_in_process_group(rank: int, world: int, init_file: str, out_dir: str,
                               cases: Mapping[str, Callable[[], dict[str, torch.Tensor]]]) -> None:
    """Join a gloo group of `world` processes, run each case in turn (a barrier after each), and save the tensors
    (`rank{r}.safetensors`, keys "case/name") and the error of each failed case (`rank{r}.json`) for
    `spawn_and_collect`."""
    import datetime
    import json

    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results, errors = {}, {}
    try:
        for case, run in cases.items():
            try:
                results.update({f"{case}/{n}": t.contiguous() for n, t in run().items()})
            except Exception as error:  # reported per case by the test
                errors[case] = f"{type(error).__name__}: {error}"
            dist.barrier()
    finally:
        save_file(results, f"{out_dir}/rank{rank}.safetensors")
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(errors, handle)
        dist.destroy_process_group()


def spawn_and_collect(worker: Callable, world: int, out_dir, timeout_s: float) -> list[tuple[dict, dict]]:
    """Run `worker(rank, world, init_file, out_dir)` in `world` spawned processes; each saves
    `rank{r}.safetensors` (keys "case/name") and `rank{r}.json` (errors per case). Per rank: {case: {name:
    tensor}} and the errors."""
    import json
    import time
    from pathlib import Path

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    out = Path(out_dir)
    context = mp.start_processes(
        worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"distributed workers still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = []
    for rank in range(world):
        results: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(out / f"rank{rank}.safetensors")).items():
            case, _, name = key.rpartition("/")
            results.setdefault(case, {})[name] = value
        ranks.append((results, json.loads((out / f"rank{rank}.json").read_text())))
    return ranks


# The cheapest classification scenario (no retraining): a base that tests change one field of.
QUICK_SCENARIO = {
    "name": "quick-digits",
    "request": {"what": "the digit 3"},
    "model": {"name": "digits-cnn"},
    "data": {"source": "digits"},
    "forget": {"kind": "class", "label": 3},
    "methods": {"ga": {"epochs": 1, "lr": 0.01}},
    "retrain": None,
    "threads": 1,
}


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over `words` (the first four: [PAD], [UNK], [CLS], [SEP]) that
    `save_pretrained` / `from_pretrained` round-trip, for tiny text models saved like any Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")


# --- edited model folders ---------------------------------------------------------------------------------------


def changed_tensors_of_loaded_folder(record: dict, run_dir, method: str, auto_class: str, original) -> int:
    """Load method `method`'s output folder with `transformers.<auto_class>.from_pretrained` (nothing copied beside
    it), check it is the folder the record names and that its tensors match `original`'s (a folder) one for one;
    return how many tensors the edit changed."""
    from pathlib import Path

    import transformers

    entry = next(e for e in record["outputs"] if e["path"] == method)
    assert entry["role"].endswith("model folder") and entry["files"]["README.md"], entry
    assert auto_class in entry["load"], entry["load"]
    loaded = getattr(transformers, auto_class).from_pretrained(Path(run_dir) / method).state_dict()
    before = getattr(transformers, auto_class).from_pretrained(original).state_dict()
    assert loaded.keys() == before.keys()
    return sum(not torch.equal(loaded[name], before[name]) for name in loaded)


def launch(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a launcher command (torchrun, accelerate launch) in its own process group, so that a hang kills the
    workers too, not only the launcher; returns exit code, stdout and stderr."""
    import os
    import signal
    import subprocess

    launched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=None if env is None else {**os.environ, **env})
    try:
        stdout, stderr = launched.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        launched.communicate()
        raise
    return launched.returncode, stdout, stderr


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a launcher's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
