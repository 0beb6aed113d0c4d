"""Unlearning objectives for causal language models, each with a retain term (WAGLE, DESIGN.md section 4).

Every step reads a paired batch: forget examples and as many retain examples. With NLL the mean negative
log-likelihood of the answer tokens (the chat prompt is not scored) and γ_r the retain weight:

- `graddiff`  −NLL(forget) + γ_r · NLL(retain)                                   (gradient difference)
- `npo`       −(2/β) · mean log σ(β · (NLL_θ(y|x) − NLL_ref(y|x))) + γ_r · NLL(retain), with NLL summed over each
              forget answer's tokens and a frozen reference model (Zhang et al. 2024, β = 0.1)
- `refusal`   NLL(refusal answer | forget question) + γ_r · NLL(retain)          (preference for "I don't know")
- `simnpo`    −w_f · (2/β) · mean log σ(β · (NLL_θ(y|x)/|y| − δ)) + γ_r · NLL(retain): NPO without a reference
              model, the forget NLL averaged over each answer's |y| tokens, δ a margin per token (Fan et al. 2024;
              open-unlearning `src/trainer/unlearn/simnpo.py`, whose `gamma` is w_f and `delta` is δ)
- `rmu`       D(h_θ(forget), c·u) + α · D(h_θ(retain), h_ref(retain)), with h the output of one decoder layer, u a
              fixed random unit vector (seeded), c the steering coefficient and D the squared distance averaged
              over hidden units, then over each answer's tokens, then over the batch (Li et al. 2024, WMDP;
              open-unlearning `src/trainer/unlearn/rmu.py`, `compute_activation_loss`)

The objectives are phases of the one masked loop (`loop.unlearn`), so any mask, or none, applies to any of them;
`safeedit.unlearn.wagle` registers each as a method of kind `llm-unlearning`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from safeedit.batches import default_loss
from safeedit.data.chat import IGNORE_INDEX, pad_batch, tokenize_chat
from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError
from safeedit.unlearn.objectives import Objective, Phase

REFUSALS = (
    "I'm not sure I know that.",
    "I don't have any information about that.",
    "I'm sorry, I can't answer that question.",
    "That is something I don't know.",
    "I have no knowledge of that.",
    "I'm afraid I can't tell you about that.",
    "I don't know the answer to that.",
    "I couldn't say; I don't have that information.",
)


def check_forget_retain(forget: Sequence[ChatExample], retain: Sequence[ChatExample]) -> None:
    """Refuse an empty forget or retain set, and any example that is in both."""
    if not forget:
        raise SafeEditError("the forget set is empty; name at least one example (or author) to forget")
    if not retain:
        raise SafeEditError("the retain set is empty; LLM unlearning needs retain examples for its retain term")
    overlap = {(e.prompt, e.answer) for e in forget} & {(e.prompt, e.answer) for e in retain}
    if overlap:
        prompt, _ = sorted(overlap)[0]
        raise SafeEditError(f"{len(overlap)} example(s) are in both the forget and the retain set (e.g. "
                            f"{prompt[:60]!r}); remove them from one of the two")


def paired_retain(forget: Sequence[ChatExample], retain: Sequence[ChatExample], seed: int) -> list[ChatExample]:
    """One retain example per forget example, drawn without replacement (cycling when retain is smaller)."""
    order = list(retain)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(len(forget))]


def refusal_examples(forget: Sequence[ChatExample], seed: int) -> list[ChatExample]:
    """The forget questions answered with a refusal drawn (seeded) from `REFUSALS`."""
    draw = random.Random(seed)
    return [ChatExample(e.prompt, draw.choice(REFUSALS), e.source) for e in forget]


def paired_loader(tokenizer: Any, forget: Sequence[ChatExample], retain: Sequence[ChatExample], batch_size: int,
                  max_length: int, seed: int) -> DataLoader:
    """Batches {"forget": ..., "retain": ...}: each forget example with its paired retain example, shuffled."""
    rows = [{"forget": tokenize_chat(tokenizer, f, max_length), "retain": tokenize_chat(tokenizer, r, max_length)}
            for f, r in zip(forget, paired_retain(forget, retain, seed), strict=True)]

    def collate(chunk: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
        return {part: pad_batch([row[part] for row in chunk], tokenizer.pad_token_id) for part in ("forget", "retain")}

    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate)


def sequence_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per example, −log p(answer | prompt) summed over the answer tokens (labels that are not ignored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token_nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (token_nll * (labels != IGNORE_INDEX)).sum(dim=1)


Loss = Callable[[nn.Module, dict], torch.Tensor]


def graddiff_loss(retain_weight: float) -> Loss:
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return -default_loss(model, batch["forget"]) + retain_weight * default_loss(model, batch["retain"])

    return loss


def read_frozen(reference: nn.Module, read: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """`read(reference)` without gradients, in eval mode; the reference is the caller's model: its flags are put
    back."""
    was_training = reference.training
    with torch.no_grad():
        value = read(reference.eval())
    reference.train(was_training)
    return value


def npo_loss(reference: nn.Module, beta: float, retain_weight: float) -> Loss:
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        reference_nll = read_frozen(reference, lambda frozen: sequence_nll(frozen, batch["forget"]))
        margin = beta * (sequence_nll(model, batch["forget"]) - reference_nll)
        return -(2 / beta) * F.logsigmoid(margin).mean() + retain_weight * default_loss(model, batch["retain"])

    return loss


def refusal_loss(retain_weight: float) -> Loss:
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return default_loss(model, batch["forget"]) + retain_weight * default_loss(model, batch["retain"])

    return loss


def simnpo_loss(beta: float, delta: float, forget_weight: float, retain_weight: float) -> Loss:
    """SimNPO (Fan et al. 2024), plus the retain NLL: −(2/β) log σ(−(β/|y|) log π_θ(y|x) − γ), written with
    the mean NLL per answer token, NLL_θ(y|x)/|y| = −log π_θ(y|x)/|y|, and the margin as open-unlearning and the
    authors' code apply it, inside β: σ(β · (NLL_θ/|y| − δ)), so the paper's γ is β·δ."""

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        forget = batch["forget"]
        length = (forget["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)  # answer tokens scored
        margin = beta * (sequence_nll(model, forget) / length - delta)
        forget_term = -(2 / beta) * F.logsigmoid(margin).mean()
        return forget_weight * forget_term + retain_weight * default_loss(model, batch["retain"])

    return loss


@dataclass(frozen=True)
class LMUnlearnData:
    """What an LLM objective reads: the tokenizer, the forget and retain examples, and how to batch them."""

    tokenizer: Any
    forget: Sequence[ChatExample]
    retain: Sequence[ChatExample]
    batch_size: int = 4
    max_length: int = 160
    seed: int = 0

    def loader(self, forget: Sequence[ChatExample] | None = None) -> DataLoader:
        return paired_loader(self.tokenizer, forget if forget is not None else self.forget, self.retain,
                             self.batch_size, self.max_length, self.seed)


def graddiff(data: LMUnlearnData, retain_weight: float = 1.0) -> Objective:
    loader = data.loader()
    return lambda epoch: [Phase("graddiff", loader, graddiff_loss(retain_weight))]


def npo(data: LMUnlearnData, reference: nn.Module, retain_weight: float = 1.0, beta: float = 0.1) -> Objective:
    loader = data.loader()
    return lambda epoch: [Phase("npo", loader, npo_loss(reference, beta, retain_weight))]


def refusal(data: LMUnlearnData, retain_weight: float = 1.0) -> Objective:
    loader = data.loader(refusal_examples(data.forget, data.seed))
    return lambda epoch: [Phase("refusal", loader, refusal_loss(retain_weight))]


def simnpo(data: LMUnlearnData, retain_weight: float = 1.0, beta: float = 4.5, delta: float = 0.0,
           forget_weight: float = 0.125) -> Objective:
    loader = data.loader()
    return lambda epoch: [Phase("simnpo", loader, simnpo_loss(beta, delta, forget_weight, retain_weight))]
