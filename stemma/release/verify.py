"""`stemma verify`: a release directory is what was signed, and its ML-BOM describes exactly its files.

1. The signature (``model.sig``) against the public key given, or else the one the release carries
   (``signing-key.pub``): with the release's own key this proves the files were not changed since signing
   (integrity), not who signed them (origin).
2. Every file against the signed manifest: a changed byte, a missing or an added file is named.
3. The ML-BOM is valid CycloneDX 1.6 and lists every other file (all but itself and the signature) with its sha256.
4. Given a workspace, the `releases` rows of this ML-BOM's version: the directory must be one of them (its ML-BOM's
   sha256 recorded) and signed with the key recorded there (the key's fingerprint is in the row's card metadata),
   else it is refused. A directory whose files, BOM and key were all replaced and re-signed passes steps 1-3 with
   its own key; the registry's record is what catches it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import StemmaError
from ..settings import when
from ..store import sha256_file
from .bom import BOM_FILE, bom_files, validate
from .signing import PUBLIC_KEY, SIGNATURE, key_fingerprint, verify_signature


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
    recorded = (_recorded(ws, d, hashlib.sha256(text.encode()).hexdigest(), key, props.get("stemma:version"))
                if ws is not None else None)
    return Verified(d, props.get("stemma:node", model.get("name", "?")), props.get("stemma:version", "?"),
                    len(actual) + 2, public_key is not None, recorded)


def _recorded(ws, d: Path, bom_digest: str, key: Path, version: str | None) -> str | None:
    """The workspace's record of this release; refused when the workspace released this version but never this
    ML-BOM, or under another key."""
    from sqlalchemy import or_, select

    from ..registry.tables import Release

    with ws.db.session() as s:
        mine = or_(Release.bom_digest == bom_digest, Release.version_id == version)
        rows = list(s.scalars(select(Release).where(mine).order_by(Release.id.desc())))
    if not rows:
        return None
    used = key_fingerprint(key.read_bytes(), key)
    same = [r for r in rows if r.bom_digest == bom_digest]
    if not same:
        listed = ", ".join(f"#{r.id}" for r in rows[:5])
        raise StemmaError(f"{d}: this registry released version {str(version)[:12]} as {listed}, never with this "
                          f"ML-BOM: the release was changed and signed again")
    row = same[0]
    recorded_key = ((row.card or {}).get("stemma") or {}).get("signing_key")
    if recorded_key != used:
        raise StemmaError(f"{d}: signed with key {used[:19]}, not the key {str(recorded_key)[:19]} recorded "
                          f"for release #{row.id}")
    return f"release #{row.id} by {row.created_by} at {when(row.created_at)}"
