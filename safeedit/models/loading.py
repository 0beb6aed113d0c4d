"""Load a model from what a user names: an embedded model, a Hugging Face folder or hub id, or a peft adapter
folder (`safeedit.models.adapters`: its base with the adapter attached).

Weights are read from safetensors only; pickled checkpoints are refused, `trust_remote_code` is off unless the
caller turns it on, and missing or mismatched weights are an error rather than silently random.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError

from safeedit.errors import SafeEditError
from safeedit.io import check_not_pickle, sha256_file
from safeedit.models.loaded import LoadedModel, check_safetensors
from safeedit.models.state import check_finite
from safeedit.models.zoo import EMBEDDED_MODELS


def load_model(
    spec: str,
    weights: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """`spec` is an embedded model name (`digits-cnn`), a folder with `config.json` and safetensors weights, a peft
    adapter folder (`adapter_config.json`: its base with the adapter attached), or a hub id. For an embedded
    model, `weights` is `shipped` (the default: the bytes the package ships), `trained` (this machine's own
    training from the recipe) or a safetensors file of the same architecture."""
    if spec in EMBEDDED_MODELS:
        model, path, origin = EMBEDDED_MODELS[spec].load(progress, weights)
        model.name_or_path = spec  # how messages name it, as transformers models carry their folder or hub id
        return LoadedModel(model.eval(), spec, files={str(path): sha256_file(path)}, origin=origin)
    if weights is not None:
        raise SafeEditError(
            f"--weights applies to embedded models ({', '.join(EMBEDDED_MODELS)}); "
            f"for {spec!r} put the weights in its folder"
        )
    path = Path(spec)
    if path.is_file():
        check_not_pickle(path)
        raise SafeEditError(
            f"{path}: a bare weights file has no architecture; pass a folder with config.json and the weights, "
            f"or an embedded model name ({', '.join(EMBEDDED_MODELS)}) with --weights {path}"
        )
    if path.is_dir():
        from safeedit.models.adapters import ADAPTER_CONFIG, load_adapter  # peft: only adapter folders need it

        if (path / ADAPTER_CONFIG).is_file():
            return load_adapter(path, lambda base: load_model(base, dtype=dtype, trust_remote_code=trust_remote_code,
                                                              progress=progress))
        if not (path / "config.json").exists():
            raise SafeEditError(f"{path}: no config.json; save the model with save_pretrained() first (a LoRA "
                                f"adapter folder holds {ADAPTER_CONFIG} and adapter_model.safetensors)")
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except ValueError as error:  # JSON or UTF-8: transformers would blame the folder, not the file
            raise SafeEditError(f"{path / 'config.json'}: not valid JSON ({error}); save the model with "
                                "save_pretrained() again") from None
        if not list(path.glob("*.safetensors")):
            pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            raise SafeEditError(
                f"{path}: no safetensors weights{' (only pickled ' + ', '.join(pickles) + ')' if pickles else ''}; "
                "re-save with model.save_pretrained(..., safe_serialization=True) where you trust the files"
            )
        for weights_file in sorted(path.glob("*.safetensors")):
            check_safetensors(weights_file)
    return _load_transformers(spec, dtype, trust_remote_code)


def _load_transformers(spec: str, dtype: torch.dtype | None, trust_remote_code: bool) -> LoadedModel:
    try:
        config = transformers.AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as error:
        why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        if Path(spec).is_dir():  # a model folder whose config.json transformers cannot use
            raise SafeEditError(f"{Path(spec) / 'config.json'}: not a model configuration transformers can read "
                                f"({why}); save the model with save_pretrained() again") from None
        raise SafeEditError(
            f"{spec!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), a model folder, or a reachable hub id "
            f"({why})"
        ) from None
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise SafeEditError(
            f"{spec}: config.json names no architecture this transformers version knows ({architecture})"
        )
    try:
        model, info = model_class.from_pretrained(
            spec, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except SafetensorError as error:  # a hub download (a folder's files were checked above)
        raise SafeEditError(
            f"{spec}: a weights file is not a valid safetensors file (truncated, empty or a pickle: "
            f"{str(error).splitlines()[0]}); re-save the model with save_pretrained(safe_serialization=True)"
        ) from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        kind, names = next(iter(problems.items()))
        raise SafeEditError(
            f"{spec}: {kind.replace('_', ' ')} when loading {architecture} (first: {sorted(names)[0]!r}); "
            "the weights do not belong to this architecture"
        )
    check_finite(model, spec)
    tokenizer = None
    with contextlib.suppress(Exception):  # a model without a tokenizer is fine: image models have none
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    image_processor = None
    if (Path(spec) / "preprocessor_config.json").exists() or not Path(spec).is_dir():
        with contextlib.suppress(Exception):
            image_processor = transformers.AutoImageProcessor.from_pretrained(spec)
    files = {str(p): sha256_file(p) for p in sorted(Path(spec).glob("*.safetensors"))} if Path(spec).is_dir() else {}
    return LoadedModel(model.eval(), spec, tokenizer, image_processor, files,
                       origin="folder" if Path(spec).is_dir() else "hub")
