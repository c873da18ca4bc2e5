"""Ingest text files, directories and JSONL into an immutable, content-addressed dataset.

A dataset is two canonical JSONL blobs (train, test) plus a datasheet, tied together by a manifest whose
sha256 is the dataset id. The split is decided per document by the hash of its text, so it is deterministic
and stable: adding documents never moves an existing one between train and test.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..store import canonical_json, sha256_file

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
"""Files a directory walk picks up as plain text (besides ``.jsonl``)."""


@dataclass(frozen=True)
class IngestOptions:
    """How a corpus becomes a dataset. Every field is part of the dataset's identity."""

    name: str
    """Dataset name; ingesting new content under the same name makes its next version."""
    license: str | None = None
    """Licence of the corpus (SPDX id where possible); a JSONL document's own ``license`` field wins for it."""
    language: str | None = None
    """Language code of the corpus (``en``, ``de``), or ``multi``."""
    domain: str | None = None
    """Domain the corpus belongs to (``software``, ``legal``)."""
    description: str | None = None
    """Free text for the datasheet."""
    test_fraction: float = 0.05
    """Share of documents held out for the test split (chosen by hash of the text)."""
    max_doc_chars: int = 16000
    """Longer documents are cut at paragraph boundaries into pieces of at most this size, so that a held-out
    split of a corpus made of few large files is still meaningful."""


@dataclass
class _Collected:
    docs: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def validate_dataset_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise DataError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' (no slashes)")
    return name


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _chunk(text: str, limit: int) -> list[str]:
    if len(text) <= limit:
        return [text]
    out, cur = [], ""
    for para in text.split("\n\n"):
        while len(para) > limit:  # a single huge paragraph: cut it hard
            if cur:
                out.append(cur)
                cur = ""
            out.append(para[:limit])
            para = para[limit:]
        if cur and len(cur) + 2 + len(para) > limit:
            out.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return [c.strip() for c in out if c.strip()]


def _read_jsonl(path: Path, col: _Collected, label: str) -> None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: each JSONL line must be an object with a string 'text' field")
            meta = {k: v for k, v in obj.items() if k != "text"}
            meta.setdefault("source", label)
            col.docs.append({"text": obj["text"], **meta})


def _read_text(path: Path, col: _Collected, label: str, strict: bool) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        if strict:
            raise DataError(f"{path}: not UTF-8 text") from None
        col.skipped_files.append(label)
        return
    col.docs.append({"text": text, "source": label})


def collect(paths: list[Path]) -> _Collected:
    """Read documents from files and directories, in a deterministic order."""
    col = _Collected()
    if not paths:
        raise DataError("no input paths given")
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        for f in files:
            label = f.name if p.is_file() else str(f.relative_to(p))
            if f.suffix == ".jsonl":
                _read_jsonl(f, col, label)
            elif p.is_file() or f.suffix.lower() in TEXT_SUFFIXES:
                _read_text(f, col, label, strict=p.is_file())
            else:
                col.skipped_files.append(label)
                continue
            col.sources.append({"file": label, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    return col


def _is_test(text_hash: str, fraction: float) -> bool:
    return int(text_hash[:13], 16) / float(16**13) < fraction


@dataclass
class BuiltDataset:
    manifest: dict[str, Any]
    train: bytes
    test: bytes

    @property
    def datasheet(self) -> dict[str, Any]:
        return self.manifest["datasheet"]


def build_dataset(paths: list[Path], opts: IngestOptions) -> BuiltDataset:
    """Read, normalise, chunk, de-duplicate and split a corpus; nothing is written."""
    validate_dataset_name(opts.name)
    if not 0.0 < opts.test_fraction < 0.5:
        raise DataError(f"test_fraction must be in (0, 0.5), got {opts.test_fraction}")
    col = collect(paths)
    docs_in = len(col.docs)
    seen: set[str] = set()
    docs: list[tuple[str, dict[str, Any]]] = []
    duplicates = 0
    for d in col.docs:
        for piece in _chunk(_normalise(d["text"]), opts.max_doc_chars):
            if not piece:
                continue
            h = hashlib.sha256(piece.encode()).hexdigest()
            if h in seen:
                duplicates += 1
                continue
            seen.add(h)
            meta = {k: v for k, v in d.items() if k != "text"}
            if opts.license and "license" not in meta:
                meta["license"] = opts.license
            docs.append((h, {"text": piece, **meta}))
    if not docs:
        raise DataError(f"corpus {', '.join(map(str, paths))} is empty: no non-blank documents")
    if len(docs) < 2:
        raise DataError("corpus has a single document after chunking; need at least 2 to hold out a test split")
    test_idx = {i for i, (h, _) in enumerate(docs) if _is_test(h, opts.test_fraction)}
    if not test_idx:  # tiny corpora: hold out the document with the smallest hash
        test_idx = {min(range(len(docs)), key=lambda i: docs[i][0])}
    if len(test_idx) == len(docs):
        test_idx.discard(max(range(len(docs)), key=lambda i: docs[i][0]))
    train_docs = [d for i, (_, d) in enumerate(docs) if i not in test_idx]
    test_docs = [d for i, (_, d) in enumerate(docs) if i in test_idx]

    licenses: dict[str, int] = {}
    for _, d in docs:
        lic = str(d.get("license") or "unknown")
        licenses[lic] = licenses.get(lic, 0) + 1
    chars = sum(len(d["text"]) for _, d in docs)
    words = sum(len(d["text"].split()) for _, d in docs)
    train_blob = b"".join(canonical_json(d) + b"\n" for d in train_docs)
    test_blob = b"".join(canonical_json(d) + b"\n" for d in test_docs)
    datasheet = {
        "name": opts.name,
        "description": opts.description,
        "license": opts.license or (next(iter(licenses)) if len(licenses) == 1 else "mixed"),
        "licenses": dict(sorted(licenses.items())),
        "language": opts.language,
        "domain": opts.domain,
        "sources": col.sources,
        "skipped_files": col.skipped_files,
        "counts": {
            "documents_read": docs_in,
            "documents": len(docs),
            "exact_duplicates_removed": duplicates,
            "train_documents": len(train_docs),
            "test_documents": len(test_docs),
            "characters": chars,
            "whitespace_tokens": words,
            "bytes": len(train_blob) + len(test_blob),
        },
        "split": {"method": "sha256(text) < test_fraction", "test_fraction": opts.test_fraction},
        "max_doc_chars": opts.max_doc_chars,
    }
    manifest = {
        "kind": "dataset",
        "schema": 1,
        "name": opts.name,
        "train": hashlib.sha256(train_blob).hexdigest(),
        "test": hashlib.sha256(test_blob).hexdigest(),
        "datasheet": datasheet,
    }
    return BuiltDataset(manifest=manifest, train=train_blob, test=test_blob)


def read_docs(blob: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in blob.decode().splitlines() if line]
