"""Output files: reproducible bytes (hashes an auditor can recompute) and atomic writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from safeedit.errors import SafeEditError
from safeedit.io import load_safetensors, save_safetensors, sha256_file

WRITER = """
import sys, torch
from safeedit.io import save_safetensors
tensors = {f"layer{i}.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) * i for i in range(8)}
tensors["flags"] = torch.tensor([True, False, True])
save_safetensors(tensors, sys.argv[1], {f"key{i}": f"value{i}" for i in range(8)})
"""


def test_same_content_gives_same_bytes_across_processes(tmp_path):
    """safetensors orders its header from a hash map; ours is canonical, so equal content hashes equal."""
    paths = [tmp_path / f"run{seed}.safetensors" for seed in (1, 2, 3)]
    for seed, path in zip((1, 2, 3), paths, strict=True):
        subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, env={"PYTHONHASHSEED": str(seed)})
    assert len({sha256_file(p) for p in paths}) == 1
    tensors, metadata = load_safetensors(paths[0])
    assert metadata == {f"key{i}": f"value{i}" for i in range(8)}
    assert torch.equal(tensors["layer3.weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4) * 3)
    assert tensors["flags"].dtype == torch.bool


def test_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path):
    path = tmp_path / "mask.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (whatever safetensors raises for a non-tensor)
        save_safetensors({"a": torch.ones(2), "b": "not a tensor"}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.safetensors"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SafeEditError, match="no such file"):
        load_safetensors(tmp_path / "absent.safetensors")
