"""Edited models written so that they load anywhere: a Hugging Face model becomes a `save_pretrained` folder.

- transformers `PreTrainedModel`: configuration, safetensors weights (sharded with an index above
  `MAX_SHARD_SIZE`), generation configuration when the model has one; `AutoModel*.from_pretrained(folder)`.
- diffusers `ModelMixin` (the generation kind's UNet): configuration and safetensors weights (sharded likewise).
- peft model: an adapter folder when the edit left the base weights as loaded (the adapter's base hash, see
  `safeedit.models.adapters`), otherwise the merged full model (`merge_and_unload` of a copy).
- the source's tokenizer, image processor or noise scheduler (`processors`) are saved beside the weights.

A model without `save_pretrained` (the embedded SmallCNN classifiers) has no folder form; its writer keeps
`<name>.safetensors` (`safeedit.runners.common.OutputWriter`).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from safeedit.io import sha256_file
from safeedit.models.adapters import base_weights_sha256, is_adapter_model
from safeedit.report.model_card import Written

# Weight files above this size are split into shards with an index (`model.safetensors.index.json`), which
# `from_pretrained` reads; transformers' own default is 50GB, too large for some file systems and uploads.
MAX_SHARD_SIZE = "2GB"

# Heads in the order the loading line prefers them: (transformers' mapping of class names, its Auto class).
AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)
# peft task types -> the AutoPeftModel class that loads the adapter and its base in one call.
AUTO_PEFT = {"CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_CLS": "AutoPeftModelForSequenceClassification",
             "TOKEN_CLS": "AutoPeftModelForTokenClassification", "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
             "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}


def library_of(model: Any) -> str | None:
    """`transformers`, `diffusers` or `peft` for a model `save_pretrained` can write; None for any other."""
    if is_adapter_model(model):
        return "peft"
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    diffusers = sys.modules.get("diffusers")
    if diffusers is not None and isinstance(model, diffusers.ModelMixin):
        return "diffusers"
    return None


def write_model_folder(folder: Path, model: nn.Module, processors: Sequence[Any] = (),
                       adapter_base_sha256: str | None = None) -> Written:
    """Write `model` (a Hugging Face model: `library_of` is not None) into the new folder `folder` with the
    `processors`; returns what was written (the model card comes from it)."""
    library, base = library_of(model), None
    form = "full model"
    if library == "peft":
        base = model.peft_config[model.active_adapter].base_model_name_or_path
        if adapter_base_sha256 is not None and base_weights_sha256(model) == adapter_base_sha256:
            form = "LoRA adapter"
            model.save_pretrained(folder, safe_serialization=True)
            sort_sets(folder / "adapter_config.json", model.peft_config[model.active_adapter])
        else:  # the base weights changed (or their source is unknown): the adapter alone would not give this model
            form, model = "merged LoRA", copy.deepcopy(model).merge_and_unload()
            library = library_of(model)
    if form != "LoRA adapter":
        model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    for processor in processors:
        if processor is not None:
            without_call_state(processor).save_pretrained(folder)
    weights = {path.name: sha256_file(path) for path in sorted(folder.glob("*.safetensors"))}
    return Written(form=form, library="peft" if form == "LoRA adapter" else library, loader=loader(model, form),
                   weights=weights, base=base)


def loader(model: Any, form: str) -> str:
    """The callable that loads the folder: an Auto class where transformers or peft has one, else the class."""
    if form == "LoRA adapter":
        task = getattr(model.peft_config[model.active_adapter], "task_type", None)
        return f"peft.{AUTO_PEFT.get(str(getattr(task, 'value', task)), 'AutoPeftModel')}"
    name = type(model).__name__
    if library_of(model) == "transformers":
        from transformers.models.auto import modeling_auto

        for mapping, auto in AUTO_CLASSES:
            names = getattr(modeling_auto, mapping, {}).values()
            if any(name == value or (isinstance(value, tuple) and name in value) for value in names):
                return f"transformers.{auto}"
    module = type(model).__module__.split(".")[0]
    return f"{module}.{name}"


def sort_sets(path: Path, config: Any) -> None:
    """Sort the lists peft wrote from sets (`target_modules`) in `path`: a set's order changes with each process's
    string hashing, so the same edit would otherwise write other bytes."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    for key, value in vars(config).items():
        if isinstance(value, set | frozenset) and isinstance(saved.get(key), list):
            saved[key] = sorted(saved[key])
    path.write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")  # as peft writes it


def without_call_state(processor: Any) -> Any:
    """`processor`, or for a fast tokenizer that a run has called, a copy without the truncation and padding its
    last call left in its backend (saved into tokenizer.json, they would depend on what the run did before)."""
    backend = getattr(processor, "backend_tokenizer", None)
    if backend is None or (backend.truncation is None and backend.padding is None):
        return processor
    clean = copy.deepcopy(processor)
    clean.backend_tokenizer.no_truncation()
    clean.backend_tokenizer.no_padding()
    return clean
