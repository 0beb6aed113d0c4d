"""The run folder's manifest: the SHA-256 of every file in it (report pages, record, signature, weights, masks),
written once the report is rendered, so that `verify` covers the very pages an auditor reads and names any file
added to or missing from the folder. When the record is signed, the manifest is signed with the same key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from safeedit.errors import SafeEditError
from safeedit.io import OWNER_FILE, sha256_file, sha256_text, write_text_atomic
from safeedit.report.signing import check_bytes, read_signature, sign_bytes, signature_path

MANIFEST = "manifest.json"
FORMAT = "safeedit.manifest/1"


def folder_files(folder: Path) -> dict[str, str]:
    """Every file below `folder`, inside model folders too (relative POSIX path -> SHA-256), the manifest and its
    signature excepted."""
    skip = {MANIFEST, signature_path(MANIFEST).name, OWNER_FILE}  # the owner file exists while a run writes
    return {path.relative_to(folder).as_posix(): sha256_file(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() not in skip}


def write_manifest(folder: Path, record_sha256: str, sign_key: str | os.PathLike | None = None) -> Path:
    """Hash every file of `folder` into `manifest.json` (and sign it with `sign_key`)."""
    text = json.dumps({"format": FORMAT, "record_sha256": record_sha256, "files": folder_files(folder)},
                      indent=2, sort_keys=True) + "\n"
    path = folder / MANIFEST
    write_text_atomic(path, text)
    if sign_key is not None:
        sign_bytes(text.encode("utf-8"), signature_path(path), sign_key, {"manifest_sha256": sha256_text(text)})
    return path


def check_manifest(folder: Path, record_sha256: str, record_files: set[str], record_ok: bool,
                   record_signer: str | None, trusted: Ed25519PublicKey | None) -> tuple[list[str], list[str]]:
    """(files checked, problems) for the run folder beyond what the record names (`record_files`: its outputs,
    itself and its signature, which the record's own checks cover): the report pages have their hashes, no file
    was added or removed, and the manifest belongs to this record (when `record_ok`: a record already found
    altered is reported once) and is signed by the record's signer. Without a manifest (a run made through the
    API, no report rendered), only the record's own files may be there."""
    path = folder / MANIFEST
    present = folder_files(folder)
    if not path.is_file():
        extra = sorted(set(present) - record_files)
        return sorted(set(present) & record_files), [
            f"{name}: extra file, not named by the record (no {MANIFEST}; render the report with `safeedit report` "
            "to cover it)" for name in extra]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed = dict(manifest["files"])
        if manifest.get("format") != FORMAT:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return [], [f"{path}: not a manifest written by safeedit; render the report again"]
    problems = []
    if record_ok and manifest.get("record_sha256") != record_sha256:
        problems.append(f"{MANIFEST}: written for another record (its record hash differs); render the report again")
    for name, digest in listed.items():
        if name in record_files:
            continue
        if name not in present:
            problems.append(f"{name}: missing (listed in {MANIFEST})")
        elif present[name] != digest:
            problems.append(f"{name}: SHA-256 mismatch: {MANIFEST} has {digest[:16]}…, the file {present[name][:16]}…")
    problems += [f"{name}: extra file, not in {MANIFEST}" for name in sorted(set(present) - set(listed) - record_files)]
    problems += _signature_problems(path, record_signer, trusted)
    return sorted(set(listed) & set(present)), problems


def _signature_problems(path: Path, record_signer: str | None, trusted: Ed25519PublicKey | None) -> list[str]:
    try:
        signature = read_signature(path)
    except SafeEditError as error:
        return [str(error)]
    if signature is None:
        return [f"{MANIFEST}: not signed, but the record is; render with `safeedit report RUN --sign KEY`"] \
            if record_signer else []
    if record_signer is not None and signature["key_fingerprint"] != record_signer:
        return [f"{MANIFEST}: signed by key {signature['key_fingerprint']}, the record by {record_signer}"]
    text = path.read_bytes()
    return [f"{MANIFEST}.sig: {p}" for p in check_bytes(text, signature, trusted, "the manifest")]


__all__ = ["MANIFEST", "check_manifest", "folder_files", "write_manifest"]
