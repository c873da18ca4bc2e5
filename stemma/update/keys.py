"""Contributor keys: ed25519 (RFC 8032) through `cryptography`.

A contributor keeps a private key; the node's owner registers the public half for that node. Every update
is signed over a digest of its header and tensors, and verified against the registered key before anything
is stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import StemmaError


class SignatureError(StemmaError):
    """An update's signature is missing, malformed or does not verify."""


def generate(path: str | Path) -> str:
    """Write a new private key (PEM, mode 0600) to ``path`` and its public key (hex) to ``path.pub``.

    Returns the public key. Refuses to overwrite an existing key.
    """
    p = Path(path)
    if p.exists():
        raise StemmaError(f"{p} exists; refusing to overwrite a key")
    if not p.parent.is_dir():
        raise StemmaError(f"{p.parent}: no such directory")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_hex(key)
    Path(str(p) + ".pub").write_text(pub + "\n")
    os.replace(tmp, p)
    return pub


def load_private(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise StemmaError(f"{p}: cannot read key ({e.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise StemmaError(f"{p}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise StemmaError(f"{p}: not an ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def parse_public(text: str) -> str:
    """A public key given as 64 hex characters or as the content of a ``.pub`` file; returns the hex."""
    t = text.strip().lower()
    try:
        raw = bytes.fromhex(t)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise StemmaError("a public key is 64 hex characters (the .pub file `stemma update keygen` writes)")
    Ed25519PublicKey.from_public_bytes(raw)
    return t


def sign(key: Ed25519PrivateKey, digest: bytes) -> str:
    return key.sign(digest).hex()


def verify(pub_hex: str, signature_hex: str, digest: bytes) -> None:
    """Raise `SignatureError` unless ``signature_hex`` is ``pub_hex``'s signature of ``digest``."""
    try:
        sig = bytes.fromhex(signature_hex)
    except (ValueError, TypeError):
        raise SignatureError("the update's signature is not hex") from None
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex)).verify(sig, digest)
    except InvalidSignature:
        raise SignatureError("the update's signature does not verify against the contributor's key") from None
