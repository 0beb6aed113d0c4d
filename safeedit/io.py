"""Safe file I/O: atomic writes, SHA-256 hashes, and safetensors loading that never unpickles."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from safeedit.errors import SafeEditError, os_problem


def cache_dir() -> Path:
    """Where trained embedded models and built data sets are cached: `$SAFEEDIT_CACHE`, else ~/.cache/safeedit."""
    return Path(os.environ.get("SAFEEDIT_CACHE", Path.home() / ".cache" / "safeedit"))


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file and an existing file is never clobbered by a failed write. `suffix`
    ends the temporary name (for writers that choose the format from it).
    """
    path = Path(path)
    if path.is_dir():
        raise SafeEditError(f"{path} is a folder; name a file to write")
    created = make_folders(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as error:
        remove_folders(created)
        raise os_problem(error, path) from error
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:  # a full disk, a file-size limit, a folder made read-only meanwhile
        raise os_problem(error, path) from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not path.exists():  # a failed write leaves no folder it made either
            remove_folders(created)


def check_output_path(path: str | os.PathLike, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file goes (or a file where
    a folder goes), or a path that runs through a file."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise SafeEditError(f"{path} is a folder; name a file to write")
    if path.is_file() and folder:
        raise SafeEditError(f"{path} is a file; name a folder for the outputs")
    blocking = next((part for part in path.parents if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        raise SafeEditError(f"{blocking}: a part of the path is a file, not a folder: fix the path")


def make_folders(folder: str | os.PathLike) -> list[Path]:
    """`mkdir -p folder`, returning the folders it made (outermost first) so that a failed write can remove them
    (`remove_folders`). A file where a folder should be is named as such; mkdir itself would only say "exists"."""
    folder = Path(folder)
    missing = []
    for part in (folder, *folder.parents):
        if part.is_dir():
            break
        missing.append(part)
    created: list[Path] = []
    for part in reversed(missing):
        try:
            part.mkdir()
        except FileExistsError:
            if part.is_dir():  # made meanwhile by another process
                continue
            remove_folders(created)
            raise os_problem(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(part))) from None
        except OSError as error:
            remove_folders(created)
            raise os_problem(error, part) from error
        created.append(part)
    return created


def remove_folders(created: list[Path]) -> None:
    """Remove folders `make_folders` made, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, progress: bool = False) -> Iterator[Path]:
    """A folder written as a transaction: fill a fresh temporary folder next to `path`, then rename it onto `path`.

    An existing non-empty `path` is refused unless `overwrite`, which replaces it as a whole (never a mix of two
    runs). Leftovers of an interrupted transaction on the same `path` (their process is gone) are removed first;
    an interruption of this one leaves nothing under the final name.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SafeEditError(f"{path} is a file; name a folder for the outputs")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SafeEditError(f"{path} already holds files (another run?); choose a new output folder, or pass "
                            "--overwrite to replace it as a whole")
    created = make_folders(path.parent)
    tmp = None
    try:
        _remove_leftovers(path, progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        (tmp / OWNER_FILE).write_text(_owner(), encoding="utf-8")
    except OSError as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_folders(created)
        raise os_problem(error, path) from error
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink()
        old = path.parent / f".{path.name}.replaced-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except OSError as error:
        raise os_problem(error, path) from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if not path.exists():  # a failed run leaves no folder it made either
            remove_folders(created)


OWNER_FILE = ".safeedit-owner"  # inside a transaction's temporary folder: host and process that write it


def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _remove_leftovers(path: Path, progress: bool) -> None:
    """Delete temporary folders of earlier transactions on `path` whose process no longer runs on this host."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if not leftover.is_dir():
            continue
        host, _, pid = (leftover / OWNER_FILE).read_text().partition(" ") if (leftover / OWNER_FILE).is_file() \
            else (socket.gethostname(), "", "")
        if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        if progress:
            print(f"removed {leftover}, the leftovers of an interrupted run", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_yaml_mapping(path: Path, shape: str) -> dict[str, Any]:
    """The YAML mapping in file `path` (parsed safely: no Python objects); a file that is not UTF-8, not YAML or not
    a mapping is one line (`shape` says what the mapping should hold)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SafeEditError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as error:
        raise SafeEditError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SafeEditError(f"{path}: {shape}")
    return raw


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of named tensors (names sorted; dtype, shape and bytes of each).

    Independent of file layout and device, so the same weights hash the same whether they came from a file,
    a hub id or memory.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SafeEditError(
            f"{path}: refusing to load a pickled checkpoint ({path.suffix}) because unpickling can run code; "
            "convert it to safetensors where you trust it (safetensors.torch.save_file) and pass that file"
        )


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """`safetensors.safe_open` (framework pt) on a file that must be safetensors: a missing, pickled or unreadable
    file is one clear line. Tensors are read only when asked for (`get_tensor`, `get_slice`)."""
    path = Path(path)
    check_not_pickle(path)
    if not path.is_file():
        raise SafeEditError(f"{path}: no such file; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError) as error:
        raise SafeEditError(
            f"{path}: not a readable safetensors file ({str(error).splitlines()[0]}); "
            "re-export it with safetensors.torch.save_file"
        ) from None


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, with a clear error for anything else."""
    with open_safetensors(path) as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors atomically (temporary file, then rename), byte-for-byte reproducible.

    safetensors serialises its JSON header from a hash map, so the same tensors and metadata give different
    bytes (and SHA-256) from one process to the next. The header is rewritten with sorted keys, so equal
    content always hashes equal, which the run records and `verify` rely on. Tensors sharing memory (tied
    weights) are stored once per name.
    """
    contiguous: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # tied weights (e.g. embeddings and LM head) are written once per name
        storages.add(t.untyped_storage().data_ptr())
        contiguous[name] = t
    with atomic_path(path) as tmp:
        raw = tmp.with_name(tmp.name + ".raw")
        try:
            save_file(contiguous, str(raw), metadata=dict(metadata or {}))
            _write_canonical_header(raw, tmp)
        except SafetensorError as error:  # safetensors reports an OS failure as text: "... (os error 27)"
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise os_problem(OSError(int(code.group(1)), os.strerror(int(code.group(1)))), path) from None
        finally:
            raw.unlink(missing_ok=True)


def canonical_header(header: Mapping[str, Any]) -> bytes:
    """A safetensors header as written to disk: the 8-byte little-endian length, then the JSON with sorted keys,
    padded with spaces to 8 bytes (equal content, equal bytes)."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_canonical_header(source: Path, target: Path) -> None:
    """Copy a safetensors file with its JSON header re-serialised by `canonical_header`."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        (length,) = struct.unpack("<Q", reader.read(8))
        writer.write(canonical_header(json.loads(reader.read(length))))
        shutil.copyfileobj(reader, writer, 1 << 24)
