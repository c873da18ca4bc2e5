"""`stemma verify`: a release directory is what was signed, and its ML-BOM describes exactly its files.

1. The signature (``model.sig``) against the public key given, or else the one the release carries
   (``signing-key.pub``): with the release's own key this proves the files were not changed since signing
   (integrity), not who signed them (origin).
2. Every file against the signed manifest: a changed byte, a missing or an added file is named.
3. The ML-BOM is valid CycloneDX 1.6 and lists every other file (all but itself and the signature) with its sha256.
4. Given a workspace, the `releases` row with this ML-BOM's sha256, if there is one: the release was signed with
   the key recorded there (its sha256 is in the row's card metadata), else it is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import StemmaError
from ..store import sha256_file
from .bom import BOM_FILE, bom_files, validate
from .signing import PUBLIC_KEY, SIGNATURE, verify_signature


@dataclass(frozen=True)
class Verified:
    path: Path
    node: str
    version: str
    files: int
    origin: bool
    """True when checked against a key given by the caller; False: the release's own key (integrity only)."""
    recorded: str | None = None
    """The `releases` row of this ML-BOM in the workspace, with who made it and when (its key matched)."""


def verify(directory: Path, public_key: Path | None = None, ws=None) -> Verified:
    d = Path(directory)
    if not d.is_dir():
        raise StemmaError(f"{d}: no such release directory")
    key = Path(public_key) if public_key is not None else d / PUBLIC_KEY
    if not key.is_file():
        raise StemmaError(f"{key}: no public key" + ("" if public_key else "; pass --public-key KEY"))
    verify_signature(d, key)
    bom_path = d / BOM_FILE
    if not bom_path.is_file():
        raise StemmaError(f"{d}: {BOM_FILE} is missing")
    text = bom_path.read_text()
    validate(text)
    doc = json.loads(text)
    listed = bom_files(doc)
    actual = {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()}
    actual = {k: p for k, p in actual.items() if k not in (BOM_FILE, SIGNATURE)}
    problems = [f"{name}: not in the ML-BOM" for name in sorted(set(actual) - set(listed))]
    problems += [f"{name}: in the ML-BOM but missing" for name in sorted(set(listed) - set(actual))]
    problems += [f"{name}: sha256 differs from the ML-BOM" for name in sorted(set(actual) & set(listed))
                 if sha256_file(actual[name]) != listed[name]]
    if problems:
        raise StemmaError(f"{d}: the ML-BOM does not match the files: {'; '.join(problems)}")
    model = doc.get("metadata", {}).get("component", {})
    props = {p["name"]: p["value"] for p in model.get("properties", [])}
    recorded = _recorded(ws, d, hashlib.sha256(text.encode()).hexdigest(), key) if ws is not None else None
    return Verified(d, props.get("stemma:node", model.get("name", "?")), props.get("stemma:version", "?"),
                    len(actual) + 2, public_key is not None, recorded)


def _recorded(ws, d: Path, bom_digest: str, key: Path) -> str | None:
    """The workspace's record of this release, refusing it when another key signed it."""
    from sqlalchemy import select

    from ..registry.tables import Release

    with ws.db.session() as s:
        row = s.scalar(select(Release).where(Release.bom_digest == bom_digest).order_by(Release.id.desc()))
        if row is None:
            return None
        recorded_key = ((row.card or {}).get("stemma") or {}).get("signing_key")
        used = "sha256:" + hashlib.sha256(key.read_bytes()).hexdigest()
        if recorded_key != used:
            raise StemmaError(f"{d}: signed with key {used[:19]}, not the key {str(recorded_key)[:19]} recorded "
                              f"for release #{row.id}")
        return f"release #{row.id} by {row.created_by} at {row.created_at:%Y-%m-%d %H:%M} UTC"
