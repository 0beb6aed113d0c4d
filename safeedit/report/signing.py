"""Ed25519 signatures over a record's canonical bytes (`safeedit.record.canonical_bytes`), with `cryptography`.

The signature is detached, next to the record as `record.json.sig` (JSON: algorithm, the signer's public key,
the record hash it covers, the signature), so signing never rewrites the record it vouches for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from safeedit.errors import SafeEditError
from safeedit.io import atomic_path, write_text_atomic
from safeedit.record import canonical_bytes, record_digest

SIGNATURE_SUFFIX = ".sig"


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 of the raw public key: what a person compares by eye."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def generate_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key (PEM, PKCS#8, owner-only) to `path` and its public key to `path`.pub."""
    path = Path(path)
    public = path.with_name(path.name + ".pub")
    for existing in (path, public):
        if existing.exists():
            raise SafeEditError(f"{existing} exists; refusing to overwrite a key (choose another path)")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with atomic_path(path) as partial:
        partial.write_bytes(private)
        partial.chmod(0o600)
    write_text_atomic(public, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    return path, public


def _load_pem(path: str | os.PathLike, private: bool) -> Any:
    path = Path(path)
    kind = "private" if private else "public"
    if not path.is_file():
        raise SafeEditError(f"{path}: no such {kind} key file; make a pair with `safeedit keygen KEY`")
    try:
        data = path.read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as error:
        raise SafeEditError(f"{path}: not an unencrypted PEM {kind} key ({error})") from None
    expected = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, expected):
        raise SafeEditError(f"{path}: an {type(key).__name__}, but records are signed with Ed25519 keys")
    return key


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    return _load_pem(path, private=True)


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    return _load_pem(path, private=False)


def signature_path(record_path: str | os.PathLike) -> Path:
    record_path = Path(record_path)
    return record_path.with_name(record_path.name + SIGNATURE_SUFFIX)


def sign_record(record: dict[str, Any], record_path: str | os.PathLike, key_path: str | os.PathLike) -> dict:
    """Sign `record` (as loaded from `record_path`) with the private key at `key_path`; write the .sig file."""
    return sign_bytes(canonical_bytes(record), signature_path(record_path), key_path,
                      {"record_sha256": record_digest(record)})


def sign_bytes(payload: bytes, path: str | os.PathLike, key_path: str | os.PathLike, covers: dict[str, str]) -> dict:
    """Write a detached Ed25519 signature of `payload` to `path`; `covers` says what it vouches for (a hash)."""
    key = load_private_key(key_path)
    signature = {
        "algorithm": "ed25519",
        "public_key": base64.b64encode(_raw(key.public_key())).decode(),
        "key_fingerprint": key_fingerprint(key.public_key()),
        **covers,
        "signature": base64.b64encode(key.sign(payload)).decode(),
    }
    write_text_atomic(path, json.dumps(signature, indent=2) + "\n")
    return signature


def read_signature(signed_path: str | os.PathLike) -> dict | None:
    """The detached signature next to `signed_path` (`<name>.sig`), or None when there is none."""
    path = signature_path(signed_path)
    if not path.is_file():
        return None
    try:
        signature = json.loads(path.read_text(encoding="utf-8"))
        base64.b64decode(signature["public_key"], validate=True)
        base64.b64decode(signature["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SafeEditError(f"{path}: damaged signature file; sign again (safeedit report RUN --sign KEY)") from None
    return signature


def check_signature(record: dict[str, Any], signature: dict, trusted: Ed25519PublicKey | None) -> list[str]:
    """Problems with `signature` over `record` (empty = valid). With `trusted`, the signer must be that key."""
    return check_bytes(canonical_bytes(record), signature, trusted, "the record")


def check_bytes(payload: bytes, signature: dict, trusted: Ed25519PublicKey | None, what: str) -> list[str]:
    """Problems with `signature` over `payload` (empty = valid); `what` names the payload in the message."""
    signer = Ed25519PublicKey.from_public_bytes(base64.b64decode(signature["public_key"]))
    if trusted is not None and _raw(signer) != _raw(trusted):
        return [f"signed by key {key_fingerprint(signer)}, not by the trusted key {key_fingerprint(trusted)}"]
    try:
        (trusted or signer).verify(base64.b64decode(signature["signature"]), payload)
    except InvalidSignature:
        return [f"the signature does not match {what} ({what} or the signature was altered)"]
    return []
