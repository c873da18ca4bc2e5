"""A signature over a whole release directory with OpenSSF model signing (``model-signing``), key method, offline.

The signer hashes every file of the directory (sha256 per file, git paths included: a ``.gitignore`` added later is
an added file like any other) except the signature itself, and signs the manifest of (path, digest) pairs as a
Sigstore bundle with an ECDSA P-256 key; verification recomputes the manifest and names every file that was changed,
added or removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import StemmaError

SIGNATURE = "model.sig"
PUBLIC_KEY = "signing-key.pub"


def _hashing():
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def public_key_pem(key: Path) -> bytes:
    """The PEM public key of an EC P-256 private key file; refuses any other key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except FileNotFoundError:
        raise StemmaError(f"{key}: no such key file") from None
    except (ValueError, TypeError) as e:
        raise StemmaError(f"{key}: not an unencrypted PEM private key ({str(e).splitlines()[0]})") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise StemmaError(f"{key}: an EC P-256 private key is needed "
                          "(openssl ecparam -name prime256v1 -genkey -noout -out key.pem)")
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_pem: bytes, where: Path | str = "public key") -> str:
    """``sha256:`` of the key's DER SubjectPublicKeyInfo: the same key gives the same fingerprint whatever its PEM
    file's line ends or comments."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as e:
        raise StemmaError(f"{where}: not a PEM public key ({str(e).splitlines()[0]})") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def sign(directory: Path, key: Path) -> None:
    """Write ``directory/model.sig`` over every other file of ``directory``."""
    from model_signing import signing

    signing.Config().set_hashing_config(_hashing()).use_elliptic_key_signer(private_key=key).sign(
        directory, directory / SIGNATURE)


def verify_signature(directory: Path, public_key: Path) -> None:
    """Refuse a directory whose files do not match the signed manifest, naming them, or a signature the key did
    not make."""
    from model_signing import verifying

    sig = directory / SIGNATURE
    if not sig.is_file():
        raise StemmaError(f"{directory}: no {SIGNATURE}: not a signed release")
    try:
        verifying.Config().set_hashing_config(_hashing()).use_elliptic_key_verifier(public_key=public_key).verify(
            directory, sig)
    except ValueError as e:
        msg = str(e).removeprefix("Signature mismatch: ")
        changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", msg)
        if changed:  # model-signing quotes both digests as raw bytes: name the files instead
            rest = re.sub(r"\\?'?Hash mismatch for .*?(?=, \\?'?Hash mismatch|$)", "", msg).strip(" ,[]'\"")
            msg = "; ".join(f"{name}: content differs from the signed manifest" for name in changed)
            msg += f"; {rest}" if rest else ""
        elif msg.startswith("[") and msg.endswith("]"):  # model-signing formats its list of differences
            msg = msg[1:-1].replace("', '", "; ").strip("'\"")
        else:  # the key itself (unreadable, or not the signer's)
            msg = f"{msg} (key {public_key})"
        raise StemmaError(f"{directory}: signature check failed: {msg}") from None
    except Exception as e:  # a bundle the key did not sign, or no bundle at all
        raise StemmaError(f"{directory}: signature check failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'invalid signature'} (key {public_key})") from None
