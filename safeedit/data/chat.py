"""Chat examples as token batches: the tokenizer's own chat template, loss on the answer tokens only.

A chat model is fine-tuned and evaluated through the template it was trained with, so a tokenizer without one is
an error (naming the fix) rather than a silent fallback to raw text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from safeedit.data.prompts import ChatExample
from safeedit.errors import SafeEditError

IGNORE_INDEX = -100


def check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SafeEditError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template; use an instruction-tuned model's "
            "tokenizer or set tokenizer.chat_template before saving it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of a user turn followed by the assistant header, ready for generation."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def tokenize_chat(tokenizer: Any, example: ChatExample, max_length: int) -> dict[str, list[int]]:
    """input_ids of prompt + answer + end-of-turn, labels masked (-100) over the prompt; cut to `max_length`."""
    check_chat_template(tokenizer)
    prompt = prompt_ids(tokenizer, example.prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}],
        tokenize=True, return_dict=False)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[: len(prompt)] != prompt:
        raise SafeEditError("the chat template renders the prompt differently with and without an answer; "
                            "this tokenizer's template is not supported for answer-only training")
    full = full[:max_length]
    labels = [IGNORE_INDEX] * min(len(prompt), len(full)) + full[len(prompt):]
    return {"input_ids": full, "labels": labels}


def pad_batch(rows: Sequence[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token lists to one length; `attention_mask` marks real tokens, padded labels are ignored."""
    length = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    if "labels" in rows[0]:
        batch["labels"] = []
    for row in rows:
        pad = length - len(row["input_ids"])

        def padded(values: list[int], fill: int, pad: int = pad) -> list[int]:
            return [*values, *[fill] * pad] if side == "right" else [*[fill] * pad, *values]

        batch["input_ids"].append(padded(row["input_ids"], pad_id))
        batch["attention_mask"].append(padded([1] * len(row["input_ids"]), 0))
        if "labels" in batch:
            batch["labels"].append(padded(row["labels"], IGNORE_INDEX))
    return {key: torch.tensor(value) for key, value in batch.items()}


def chat_loader(tokenizer: Any, examples: Sequence[ChatExample], batch_size: int = 8, max_length: int = 192,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Training batches (right-padded, answer-only labels); shuffled by a generator seeded with `seed`."""
    if not examples:
        raise SafeEditError("no chat examples to train on; the data set is empty")
    rows = [tokenize_chat(tokenizer, e, max_length) for e in examples]
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=lambda chunk: pad_batch(chunk, tokenizer.pad_token_id))


def prompt_loader(tokenizer: Any, prompts: Sequence[str], batch_size: int = 16,
                  answers: Sequence[str] | None = None) -> DataLoader:
    """Left-padded batches of chat-formatted prompts (or prompt + answer turns), for generation and calibration."""
    check_chat_template(tokenizer)
    if not prompts:
        raise SafeEditError("no prompts given; the prompt set is empty")
    if answers is None:
        rows = [{"input_ids": prompt_ids(tokenizer, p)} for p in prompts]
    else:
        rows = [{"input_ids": tokenize_chat(tokenizer, ChatExample(p, a), 10_000)["input_ids"]}
                for p, a in zip(prompts, answers, strict=True)]
    return DataLoader(rows, batch_size=batch_size, shuffle=False,
                      collate_fn=lambda chunk: pad_batch(chunk, tokenizer.pad_token_id, side="left"))
