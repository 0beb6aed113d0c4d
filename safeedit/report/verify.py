"""`safeedit verify`: are these the very files the record says were evaluated, and is the record as written?

Checks, each reported on its own line: the record parses and matches its schema; its integrity hash matches its
canonical bytes; its verdict follows from its own results and criteria; every input and output file exists
with the recorded SHA-256 (an output model folder: every file in it); when a signature or trusted public key is
present, the Ed25519 signature; and the run folder against its manifest (`manifest.py`): the report pages
included, no file added or missing (inside model folders too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from safeedit.criteria import Criterion, verdict
from safeedit.errors import SafeEditError
from safeedit.io import sha256_file
from safeedit.record import listing_sha256, output_files, read_record, record_digest, record_file
from safeedit.report.manifest import MANIFEST, check_manifest
from safeedit.report.signing import check_signature, key_fingerprint, load_public_key, read_signature


@dataclass
class Verification:
    record_path: Path
    checked: list[str] = field(default_factory=list)  # what passed, for the summary line
    problems: list[str] = field(default_factory=list)  # one line per mismatch
    files: list[str] = field(default_factory=list)  # the run folder's files whose hashes were checked

    @property
    def ok(self) -> bool:
        return not self.problems


def _resolve(entry_path: str, bases: list[Path]) -> Path:
    path = Path(entry_path)
    if path.is_absolute():
        return path
    return next((base / path for base in bases if (base / path).exists()), bases[0] / path)


def verify_run(target: str | os.PathLike, pubkey: str | os.PathLike | None = None) -> Verification:
    """Verify a run folder or record file; never raises for a mismatch, only for unusable arguments."""
    if not Path(target).exists():  # a mistyped path is not a tampered run
        raise SafeEditError(f"{target}: no such run folder or record file; check the path")
    record_path = record_file(target)
    trusted = load_public_key(pubkey) if pubkey else None
    try:
        record = read_record(record_path)
    except SafeEditError as error:
        return Verification(record_path, problems=[str(error)])
    return verify_record(record, record_path, trusted)


def verify_record(record: dict, record_path: Path, trusted: Ed25519PublicKey | None = None,
                  folder_manifest: bool = True) -> Verification:
    """The checks of `verify_run` on a record already read (and schema-checked) from `record_path`; without
    `folder_manifest`, the run folder's manifest is not checked (the report is being rendered)."""
    result = Verification(record_path)
    if record_digest(record) != record["integrity"]["sha256"]:
        result.problems.append(f"{record_path}: integrity hash mismatch: the record was changed after it was written")
    else:
        result.checked.append("record integrity")

    criteria = [Criterion.model_validate(c) for c in record["scenario"].get("criteria", [])]
    if verdict(criteria, record["results"]) != record["verdict"]:
        result.problems.append(f"{record_path}: the verdict does not follow from the record's results and criteria")
    else:
        result.checked.append("verdict")

    folder = record_path.parent
    working = Path(record.get("working_directory", "."))
    entries = [({"path": path, "sha256": digest, "role": role}, [folder])
               for path, (digest, role) in output_files(record).items()]  # a model folder: each of its files
    entries += [(entry, [working, folder, Path.cwd()]) for entry in record["inputs"]]
    file_problems = [f"{entry['path']}: the folder's listing hash does not match its files ({entry['role']})"
                     for entry in record["outputs"] if "files" in entry and listing_sha256(entry["files"])
                     != entry["sha256"]]
    for entry, bases in entries:
        path = _resolve(entry["path"], bases)
        if not path.is_file():
            file_problems.append(f"{entry['path']}: missing ({entry['role']}; looked for {path})")
        elif (found := sha256_file(path)) != entry["sha256"]:
            file_problems.append(
                f"{entry['path']}: SHA-256 mismatch ({entry['role']}): recorded {entry['sha256'][:16]}…, "
                f"file has {found[:16]}…"
            )
    result.problems.extend(file_problems)
    if not file_problems:
        result.checked.append(f"{len(entries)} files")

    try:
        signature = read_signature(record_path)
    except SafeEditError as error:
        result.problems.append(str(error))
        return result
    if signature is None:
        if trusted is not None:
            result.problems.append(f"{record_path}: not signed (no {record_path.name}.sig), but --pubkey asks for it")
    else:
        problems = check_signature(record, signature, trusted)
        result.problems.extend(f"{record_path}.sig: {p}" for p in problems)
        if not problems:
            who = f"key {key_fingerprint(trusted)}" if trusted else (
                f"key {signature['key_fingerprint']}, not checked against a trusted key (pass --pubkey)")
            result.checked.append(f"Ed25519 signature by {who}")
    if folder_manifest:
        record_files = set(output_files(record)) | {record_path.name, f"{record_path.name}.sig"}
        result.files, problems = check_manifest(folder, record["integrity"]["sha256"], record_files,
                                                not result.problems, signature["key_fingerprint"] if signature
                                                else None, trusted)
        result.problems.extend(problems)
        if not problems:
            result.checked.append(f"the run folder ({len(result.files)} files, "
                                  + ("manifest" if (folder / MANIFEST).is_file() else "no report") + ")")
    return result
