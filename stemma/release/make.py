"""`stemma release`: a signed directory with the model's files, a model card and an ML-BOM, and a row in `releases`.

Refused before anything is written. First, every reason known without measuring, at once: the format does not fit
the version, the key is not an EC P-256 private key, a risk flag reaches the version, the release licence is not
SPDX or drops an obligation of the lineage (or none is given and the obligations imply none). Then, only when none
of those refuses, the node's release gate (which may measure task scores the version lacks; it judges the node's
current version only). Otherwise the directory is written beside DIR: the files as `stemma pull`
(``hf``, ``gguf``) or `stemma export` (``adapter``) write them, ``README.md`` (the model card), ``signing-key.pub``,
``bom.cdx.json`` (listing every file above with its sha256) and ``model.sig`` (over every file), then renamed into
place; the `releases` row follows. Any failure leaves no DIR and no row.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import StemmaError
from ..licenses import Licensing, licensing, parse_release_license
from ..store import check_out_dir, sha256_file, staged_dir
from ..workspace import VersionInfo, Workspace
from . import card
from .bom import BOM_FILE, make_bom
from .facts import gather
from .signing import PUBLIC_KEY, SIGNATURE, key_fingerprint, public_key_pem, sign

FORMATS = ("hf", "adapter", "gguf")


@dataclass(frozen=True)
class Released:
    path: Path
    version: str
    node: str
    format: str
    license: str
    bom_digest: str
    release_id: int
    files: int


@dataclass(frozen=True)
class Verdict:
    """Whether a version may be released, and what its release says."""

    license: str | None
    """The release licence: the one given (normalised) or the one the obligations imply."""
    gate: tuple[str, ...]
    licensing: Licensing
    reasons: tuple[str, ...]
    """Why it is refused (empty: it may be released)."""


def refusals(ws: Workspace, v: VersionInfo, fmt: str, license: str | None, key: Path | None = None) -> Verdict:
    """The verdict on releasing ``v`` as ``fmt`` under ``license`` (None: the implied one), signed with ``key``.

    What is known without measuring (format, key, flags, licence) is checked first, every reason at once; the
    release gate, which may have to measure task scores the node lacks, is judged only when none of those
    refuses.
    """
    from ..evaluate.gate import judge
    from ..lineage import ADAPTER
    from ..risk import flags_reaching

    reasons: list[str] = []
    if fmt not in FORMATS:
        reasons.append(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    elif fmt == "adapter" and ws.plan(v.id).kind != ADAPTER:
        reasons.append(f"{v.row.node_path} is a {v.row.relation} version, not an adapter: release it as hf or gguf")
    if key is not None:
        try:
            public_key_pem(key)
        except StemmaError as e:
            reasons.append(f"key: {e}")
    reasons += [f"risk: {f.label}" for f in flags_reaching(ws, v.id)]
    lic = licensing(ws, v.id)
    if license is not None:
        try:
            license = parse_release_license(license)
        except StemmaError as e:
            reasons.append(f"licence: {e}")
            license = None
        else:
            if len(license) > 400:  # the releases table's column
                reasons.append(f"licence: the expression has {len(license)} characters, more than 400")
            reasons += [f"licence: {c}" for c in lic.conflicts(license)]
    elif lic.implied is None:
        ids = ", ".join(sorted({o.license for o in lic.obligations})) or "none recorded"
        reasons.append(f"licence: the obligations ({ids}) imply no single licence; pass --license SPDX")
    node = ws.node(v.row.node_path)
    lines: list[str] = []
    if node is not None and node.release_gate:
        if node.current_version != v.id:
            reasons.append(f"release gate: it judges {v.row.node_path}'s current version, not {v.short}")
        elif not reasons:
            _, thresholds = judge(ws, v.row.node_path)
            lines = [t.reason for t in thresholds]
            reasons += [f"release gate: {t.reason}" for t in thresholds if not t.ok]
    return Verdict(license or lic.implied, tuple(lines), lic, tuple(reasons))


def release(ws: Workspace, ref: str, out: Path, key: Path, fmt: str = "hf", license: str | None = None,
            by: str | None = None) -> Released:
    """Release the version ``ref`` names into ``out`` (see the module docstring)."""
    from ..registry.tables import Release
    from ..settings import actor

    v = ws.resolve_version(ref)
    out = check_out_dir(out, can_force=False)
    verdict = refusals(ws, v, fmt, license, key)
    if verdict.reasons:
        raise StemmaError(f"release of {v.label} refused: {'; '.join(verdict.reasons)}")
    license, pub = verdict.license, public_key_pem(key)
    with staged_dir(out) as stage:
        _write_files(ws, v, fmt, stage)
        facts = gather(ws, v, fmt, verdict, key_fingerprint(pub))
        meta = card.metadata(facts)
        (stage / "README.md").write_text(card.render(facts, meta))
        (stage / PUBLIC_KEY).write_bytes(pub)
        files = {p.relative_to(stage).as_posix(): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        bom_text = make_bom(facts, files)
        (stage / BOM_FILE).write_text(bom_text)
        sign(stage, key)
    bom_digest = hashlib.sha256(bom_text.encode()).hexdigest()
    try:
        with ws.db.session() as s:
            row = Release(version_id=v.id, format=fmt, license=license, bom_digest=bom_digest, card=meta,
                          created_by=by or actor())
            s.add(row)
            s.flush()
            rid = row.id
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return Released(out, v.id, v.row.node_path, fmt, license, bom_digest, rid, len(files) + 2)


def _write_files(ws: Workspace, v: VersionInfo, fmt: str, stage: Path) -> Path:
    """The model's files as `stemma pull` or `stemma export` write them."""
    if fmt == "adapter":
        from ..export import export

        return export(ws, v.id, stage, fmt="adapter")
    from ..pull import pull

    return pull(ws, v, stage, fmt=fmt)


__all__ = ["FORMATS", "Released", "SIGNATURE", "Verdict", "refusals", "release"]
