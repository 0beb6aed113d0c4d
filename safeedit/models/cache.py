"""Models trained as part of a setting (a fine-tune to unlearn, a reference, a task model to merge), cached by
everything that determines them: a second run, or a run with other method options, starts from the same weights,
and any change to what the key names trains again, so nothing stale is reused."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from safeedit.data.prompts import ChatExample
from safeedit.io import cache_dir, load_safetensors, save_safetensors, sha256_text
from safeedit.models.state import load_state_dict_strict
from safeedit.progress import say

if TYPE_CHECKING:
    from safeedit.models.lm_training import FinetuneOptions


def cached_weights(folder: str, label: str, key: Mapping[str, Any], empty: Callable[[], nn.Module],
                   train: Callable[[], nn.Module], metadata: Mapping[str, str], progress: bool
                   ) -> tuple[nn.Module, Path, bool]:
    """A trained model from the cache, or `train()` and cache it: the file is `<cache>/<folder>/<label>-<hash of
    key>.safetensors`, so any change to what the key names retrains and nothing stale is reused. `empty()` builds
    the architecture the cached tensors are loaded into (strictly). Returns the model, its file and whether it
    came from the cache."""
    digest = sha256_text(json.dumps(key, sort_keys=True))[:16]
    path = cache_dir() / folder / f"{label}-{digest}.safetensors"
    if path.exists():
        say(f"{label}: cached ({path})", progress)
        model = empty()
        tensors, _ = load_safetensors(path)
        load_state_dict_strict(model, tensors, str(path))
        return model.eval(), path, True
    model = train()
    save_safetensors(model.state_dict(), path, dict(metadata))
    return model, path, False


def cached_finetune(model: nn.Module, tokenizer: Any, examples: list[ChatExample], options: FinetuneOptions,
                    seed: int, what: str, source_sha256: str, progress: bool) -> tuple[nn.Module, Path]:
    """Fine-tune `model` (or load the cached result of the same fine-tune): keyed by the source weights, the
    examples, the options and the seed."""
    from safeedit.models.lm_training import finetune_chat, with_lora  # peft: only LM runners need it

    key = {"what": what, "source": source_sha256, "options": options.model_dump(), "seed": seed,
           "examples": sha256_text(json.dumps([[e.prompt, e.answer] for e in examples]))}

    def empty() -> nn.Module:
        # An unmerged LoRA fine-tune is stored and reloaded with its adapter (to prune its factors: layers `lora`).
        return with_lora(model, options) if options.lora_rank and not options.merge else copy.deepcopy(model)

    def train() -> nn.Module:
        say(f"{what}: fine-tuning on {len(examples)} examples (cached afterwards)", progress)
        return finetune_chat(model, tokenizer, examples, options, seed, progress, what)

    tuned, path, _ = cached_weights("lm", what, key, empty, train,
                                    {"what": what, "source_weights_sha256": source_sha256}, progress)
    return tuned, path
