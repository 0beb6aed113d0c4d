"""What a loader returns (`LoadedModel`, with `AdapterSource` for peft adapter folders), and the safetensors header
check every weights file passes before anything reads it; shared by `safeedit.models.loading` and
`safeedit.models.adapters` (which loads an adapter's base through a loader it is handed)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from safeedit.errors import SafeEditError
from safeedit.io import tensors_sha256


@dataclass(frozen=True)
class AdapterSource:
    """Where a model loaded from a peft adapter folder came from (`safeedit.models.adapters`)."""

    folder: str  # the adapter folder
    base: str  # its base model, as adapter_config.json names it (base_model_name_or_path)
    base_sha256: str  # content hash of the base weights as loaded: an edit that leaves it is an adapter edit


@dataclass
class LoadedModel:
    model: nn.Module
    source: str
    tokenizer: Any = None
    image_processor: Any = None
    files: dict[str, str] = field(default_factory=dict)  # weight file path -> SHA-256 of its bytes
    origin: str = "folder"  # embedded models: shipped | trained | file; otherwise folder, hub or adapter
    adapter: AdapterSource | None = None  # set when `source` is a peft adapter folder

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Content hash of the weights as loaded (independent of file layout). Hashed once: every edit works on a
        copy, so the loaded model never changes (a 135M-parameter model takes about a second to hash)."""
        return tensors_sha256(self.model.state_dict())


def check_safetensors(path: Path) -> None:
    """Refuse a weights file whose safetensors header does not parse or does not cover the file (empty, truncated,
    or another format saved under the name, such as torch.save's pickle), before transformers reads it. Only the
    header is read; nothing is unpickled."""
    with path.open("rb") as handle:
        start = handle.read(4)
    if not start:
        why = "it is empty"
    elif start[:1] == b"\x80" or start == b"PK\x03\x04":
        why = "it is a pickle or torch.save archive; it was not opened"
    else:
        try:
            with safe_open(str(path), framework="pt"):
                return
        except (SafetensorError, OSError, ValueError) as error:
            why = (str(error).splitlines() or [type(error).__name__])[0].replace("Error while deserializing ", "bad ")
    raise SafeEditError(
        f"{path} is not a valid safetensors file (truncated, empty or a pickle: {why}); "
        "re-save the model with save_pretrained(safe_serialization=True)"
    )
