"""Read text files, directories and JSONL into documents, streaming, and report every bad input per file.

A corpus is read once, line by line, into shard files of canonical JSONL (`stemma.data.curate.pipeline` runs the
steps over them). Memory stays bounded by one line (at most ``max_line_bytes``) and one document. Bad input is
counted and reported per file with a one-line reason and never aborts the run (unless ``strict``): binary files,
invalid UTF-8, empty files, over-long lines, malformed JSONL lines, lines without a string ``text``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
"""Files a directory walk picks up as plain text (besides ``.jsonl``)."""
PROBLEMS_PER_FILE = 5
"""Problems listed per file in the datasheet (all are counted)."""
_BINARY_PROBE = 8192


@dataclass
class FileReport:
    """What reading one input file gave: documents, and every problem by kind."""

    file: str
    bytes: int
    sha256: str = ""
    documents: int = 0
    status: str = "ok"
    """``ok``, ``partial`` (some lines skipped) or ``skipped`` (nothing read from it)."""
    reason: str | None = None
    """One line saying why the file or its lines were skipped."""
    problems: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def problem(self, kind: str, message: str) -> None:
        self.problems[kind] = self.problems.get(kind, 0) + 1
        if len(self.examples) < PROBLEMS_PER_FILE:
            self.examples.append(message)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "bytes": self.bytes, "sha256": self.sha256,
                               "documents": self.documents, "status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.problems:
            out["problems"] = dict(sorted(self.problems.items()))
            out["problem_examples"] = self.examples
        return out


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def chunk(text: str, limit: int) -> list[str]:
    """Cut a long text at paragraph boundaries into pieces of at most ``limit`` characters."""
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


def doc_id(text: str) -> tuple[str, str]:
    """(id, full sha256) of a document's text as read."""
    h = hashlib.sha256(text.encode()).hexdigest()
    return h[:16], h


def is_test(full_hash: str, fraction: float) -> bool:
    return int(full_hash[:13], 16) / float(16**13) < fraction


@dataclass(frozen=True)
class ReadOptions:
    max_doc_chars: int = 16000
    max_line_bytes: int = 8 << 20
    """A longer line (JSONL record, or a line of a text file) is skipped and reported: nothing holds it whole."""
    max_text_file_bytes: int = 64 << 20
    """A plain-text file is one document (then chunked); past this size each paragraph group is chunked as read."""
    strict: bool = False
    """Raise on the first bad input instead of reporting it and going on."""


class _Lines:
    """Binary lines of a file, each at most ``limit`` bytes; an over-long line is consumed without being held."""

    def __init__(self, f, limit: int):
        self.f, self.limit = f, limit

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        lineno = 0
        while True:
            line = self.f.readline(self.limit + 1)
            if not line:
                return
            lineno += 1
            if len(line) > self.limit and not line.endswith(b"\n"):
                while True:  # drain the rest of the line in bounded pieces
                    rest = self.f.readline(1 << 20)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield lineno, None
                continue
            yield lineno, line


def _fail(rep: FileReport, opts: ReadOptions, kind: str, message: str) -> None:
    rep.problem(kind, message)
    if opts.strict:
        raise DataError(f"{rep.file}: {message}")


def _jsonl_docs(f, rep: FileReport, opts: ReadOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, raw in _Lines(f, opts.max_line_bytes):
        if raw is None:
            _fail(rep, opts, "line_too_long", f"line {lineno}: longer than {opts.max_line_bytes} bytes, skipped")
            continue
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(rep, opts, "not_utf8", f"line {lineno}: not UTF-8 (byte {e.start}), skipped")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(rep, opts, "bad_json", f"line {lineno}: not valid JSON ({e.msg}), skipped")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            _fail(rep, opts, "no_text", f"line {lineno}: not an object with a string 'text' field, skipped")
            continue
        try:
            obj["text"].encode("utf-8")
        except UnicodeEncodeError:  # an escaped lone surrogate ("\udcff") is valid JSON but no text
            _fail(rep, opts, "not_unicode", f"line {lineno}: 'text' holds a lone surrogate escape, skipped")
            continue
        meta = {k: v for k, v in obj.items() if k not in ("text", "id", "split")}
        yield obj["text"], meta


def _text_docs(f, rep: FileReport, opts: ReadOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    """A text file is one document; a very large one is cut into groups of paragraphs as it is read."""
    buf: list[str] = []
    size = 0
    bad_utf8 = 0
    for lineno, raw in _Lines(f, opts.max_line_bytes):
        if raw is None:
            _fail(rep, opts, "line_too_long", f"line {lineno}: longer than {opts.max_line_bytes} bytes, skipped")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_utf8 += 1
            _fail(rep, opts, "not_utf8", f"line {lineno}: not UTF-8 (byte {e.start}), skipped")
            continue
        buf.append(line)
        size += len(raw)
        if size > opts.max_text_file_bytes and not line.strip():  # flush at a paragraph break
            yield "".join(buf), {}
            buf, size = [], 0
    if buf:
        yield "".join(buf), {}


def _files(p: Path) -> list[tuple[Path, str]]:
    if p.is_file():
        return [(p, p.name)]
    return [(f, str(f.relative_to(p))) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]


def read_documents(paths: list[Path], opts: ReadOptions, reports: list[FileReport]
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(text, meta)`` for every normalised, chunked document of ``paths``, in a deterministic order.

    ``reports`` receives one `FileReport` per file as it is finished (skipped files too)."""
    if not paths:
        raise DataError("no input paths given")
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
    for p in map(Path, paths):
        for f, label in _files(p):
            rep = FileReport(file=label, bytes=f.stat().st_size)
            reports.append(rep)
            if f.suffix != ".jsonl" and not p.is_file() and f.suffix.lower() not in TEXT_SUFFIXES:
                rep.status, rep.reason = "skipped", f"not a text or JSONL file ({f.suffix})"
                continue
            if rep.bytes == 0:
                rep.status, rep.reason = "skipped", "empty file"
                _fail(rep, opts, "empty", "empty file")
                continue
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                head = fh.read(_BINARY_PROBE)
                if b"\x00" in head and f.suffix != ".jsonl":
                    rep.status, rep.reason = "skipped", "binary file (NUL bytes), skipped"
                    _fail(rep, opts, "binary", "binary file (NUL bytes)")
                    continue
                fh.seek(0)
                hashed = _Hashing(fh, h)
                gen = _jsonl_docs(hashed, rep, opts) if f.suffix == ".jsonl" else _text_docs(hashed, rep, opts)
                for text, meta in gen:
                    meta.setdefault("source", label)
                    for piece in chunk(normalise(text), opts.max_doc_chars):
                        if not piece:
                            continue
                        rep.documents += 1
                        yield piece, meta
            rep.sha256 = h.hexdigest()
            if rep.documents == 0:
                rep.status = "skipped"
                rep.reason = rep.reason or ("; ".join(rep.examples[:1]) if rep.problems else "empty (no text in it)")
                if not rep.problems:
                    _fail(rep, opts, "empty", "empty (no text in it)")
            elif rep.problems:
                rep.status = "partial"
                n = sum(rep.problems.values())
                rep.reason = f"{n} line(s) skipped: " + rep.examples[0]


class _Hashing:
    """A binary file whose every byte read is also fed to a hash (the file's sha256 in one pass)."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def readline(self, limit: int = -1) -> bytes:
        b = self.f.readline(limit)
        self.h.update(b)
        return b
