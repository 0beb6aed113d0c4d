"""Turn a `datasets.Dataset` into batches a model accepts: tokenise text, pad, and batch with a DataLoader."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from safeedit.errors import SafeEditError

TENSOR_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "label", "labels")


def is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")


def make_loader(
    dataset: Dataset,
    model: nn.Module,
    tokenizer: Any = None,
    batch_size: int = 32,
    max_length: int = 256,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Batches of `dataset` for `model`: text (column `text`) is tokenised; causal LMs get labels = tokens.

    With `shuffle`, the order comes from a generator seeded with `seed`, so a run repeats exactly."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if "text" in dataset.column_names and "input_ids" not in dataset.column_names:
        if tokenizer is None:
            raise SafeEditError(
                "the data has a 'text' column but the model has no tokenizer; give a model folder with one"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dataset = dataset.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length),
            batched=True,
            desc="tokenising",
        )
    columns = [c for c in TENSOR_COLUMNS if c in dataset.column_names]
    if not columns:
        raise SafeEditError(
            f"the data has none of the columns a model reads ({', '.join(TENSOR_COLUMNS)}, or 'text'); "
            f"it has {', '.join(dataset.column_names)}"
        )
    dataset = dataset.select_columns(columns)
    if "input_ids" in columns:
        collator = (
            DataCollatorForLanguageModeling(tokenizer, mlm=False)
            if is_causal_lm(model) and "labels" not in columns
            else DataCollatorWithPadding(tokenizer)
        )
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)
    return DataLoader(dataset.with_format("torch"), batch_size=batch_size, shuffle=shuffle, generator=generator)
