"""Turn a `datasets.Dataset` into batches a model accepts: tokenise text, pad, and batch with a DataLoader."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from safeedit.batches import check_inputs, model_name
from safeedit.data.sources import spec_of
from safeedit.errors import SafeEditError

IN_MEMORY_BYTES = 2 << 30  # numeric data sets up to 2 GiB are batched from memory
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
    image_processor: Any = None,
) -> DataLoader:
    """Batches of `dataset` for `model`: text (column `text`) is tokenised; causal LMs get labels = tokens.

    Images (a `datasets.Image` column named `image` or `img`) go through the model's image processor when it
    has one, else become float tensors in [0, 1], channels first. With `shuffle`, the order comes from a
    generator seeded with `seed`, so a run repeats exactly."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    data = f"data {spec_of(dataset)!r}" if spec_of(dataset) else "the data"
    image_column = next((c for c in ("image", "img") if isinstance(dataset.features.get(c), datasets.Image)), None)
    provided = _provided_inputs(dataset.column_names, image_column)
    if not provided:
        raise SafeEditError(
            f"{data} has no input column a model reads ('text', 'image', 'input_ids' or 'pixel_values'); it has "
            f"{', '.join(dataset.column_names)}; rename its input column to 'text' (or 'image' for pictures)"
        )
    check_inputs(model, provided, data)
    _check_label(dataset, data)
    if provided.get("input_ids") == "text":
        if tokenizer is None:
            raise SafeEditError(
                f"{data} has text (column 'text') but model {model_name(model)} has no tokenizer; save one next to "
                "the weights with tokenizer.save_pretrained"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dataset = dataset.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length),
            batched=True,
            desc="tokenising",
        )
    if image_column and provided.get("pixel_values") == image_column:
        return _image_loader(dataset, image_column, image_processor, batch_size, shuffle, generator, data)
    columns = [c for c in TENSOR_COLUMNS if c in dataset.column_names]
    dataset = dataset.select_columns(columns)
    if "input_ids" in columns:
        collator = (
            DataCollatorForLanguageModeling(tokenizer, mlm=False)
            if is_causal_lm(model) and "labels" not in columns
            else DataCollatorWithPadding(tokenizer)
        )
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)
    if dataset.data.nbytes <= IN_MEMORY_BYTES:
        return _in_memory_loader(dataset, columns, batch_size, shuffle, generator)
    return DataLoader(dataset.with_format("torch"), batch_size=batch_size, shuffle=shuffle, generator=generator)


def _check_label(dataset: Dataset, data: str) -> None:
    """A `label` column of text, or of values that mix types (a JSON file with 0 on one line and "x" on another),
    would otherwise fail in the collator, far from the file."""
    feature = dataset.features.get("label")
    if isinstance(feature, datasets.Value) and "string" in feature.dtype:
        kind = "text"
    elif isinstance(feature, datasets.Json):
        kind = "values of mixed types"
    else:
        return
    example = next((value for value in dataset["label"] if not isinstance(value, int | float)), None)
    raise SafeEditError(
        f"column 'label' of {data} holds {kind} (e.g. {example!r}), not class numbers; write every label as an "
        "integer 0, 1, ..."
    )


def _provided_inputs(columns: list[str], image_column: str | None) -> dict[str, str]:
    """The model inputs the batches will hold (`input_ids`, `pixel_values`) -> the data column each comes from."""
    provided = {}
    if "input_ids" in columns or "text" in columns:
        provided["input_ids"] = "input_ids" if "input_ids" in columns else "text"
    if "pixel_values" in columns or image_column:
        provided["pixel_values"] = "pixel_values" if "pixel_values" in columns else image_column
    return provided


class _IndexBatches:
    """Collate a list of row indices into a dict of tensor slices (no per-row conversion)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def tensor_loader(tensors: dict[str, torch.Tensor], batch_size: int, shuffle: bool,
                  generator: torch.Generator | None) -> DataLoader:
    """Batches sliced from equal-length tensor columns, in the order a sampler over row indices gives: the same
    batches as `make_loader` for the same rows and seed."""
    rows = len(next(iter(tensors.values())))
    return DataLoader(range(rows), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=_IndexBatches(tensors))


def _in_memory_loader(
    dataset: Dataset, columns: list[str], batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> DataLoader:
    """Tensor columns read once, batches sliced from them: ~50× faster per epoch than row-wise Arrow reads, and
    the same order as the Arrow path for the same seed (the sampler only sees row indices)."""
    return tensor_loader(dataset.with_format("torch", columns=columns)[:], batch_size, shuffle, generator)


def _image_loader(
    dataset: Dataset, column: str, processor: Any, batch_size: int, shuffle: bool, generator: torch.Generator | None,
    data: str = "the data",
) -> DataLoader:
    """Images are decoded here, batch by batch, rather than by `datasets` (which decodes lazily too, where a broken
    file would surface as a bare PIL error in the middle of a run): a file that does not decode is named."""
    label = next((c for c in ("label", "labels") if c in dataset.column_names), None)
    decoder = datasets.Image(mode=dataset.features[column].mode)  # the data set's mode (e.g. RGB) still applies

    def decode(value: dict) -> Any:
        try:
            return decoder.decode_example(value)
        except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated files
            where = f"image {value.get('path')}" if value.get("path") else f"an image in {data}"
            raise SafeEditError(f"{where} cannot be decoded ({error}); re-save or remove it") from None

    def to_tensors(rows: dict) -> dict:
        images = [decode(value) for value in rows[column]]
        if processor is not None:
            pixels = processor(images, return_tensors="pt")["pixel_values"]
        else:
            arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
            if len({a.shape for a in arrays}) > 1:
                raise SafeEditError(
                    f"the images in {data} differ in size or channels ({arrays[0].shape} and "
                    f"{next(a.shape for a in arrays if a.shape != arrays[0].shape)}); resize them to one size"
                )
            pixels = torch.from_numpy(np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]))
        return {"pixel_values": pixels, **({"label": torch.as_tensor(rows[label])} if label else {})}

    dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return DataLoader(dataset.with_transform(to_tensors), batch_size=batch_size, shuffle=shuffle, generator=generator)
