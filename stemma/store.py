"""Content-addressed blob store.

A blob is named by the sha256 of its bytes and lives at ``store/sha256/ab/cdef...``. Writes go to a
temporary file in the same directory and are renamed into place, so a reader never sees half a blob and a
crash leaves at most a stray temporary file. Manifests are canonical JSON blobs; the id of a version or a
dataset is the hash of its manifest, so identical content always gets the identical id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StemmaError, StoreError

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` so that equal objects give equal bytes (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_out_dir(out: Path, force: bool = False, can_force: bool = True) -> Path:
    """``out`` as an absolute path, refused when it holds something (unless ``force``: then it is replaced)."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise StemmaError(f"{out} exists and is not empty; choose another --out" + (" or pass --force" if can_force
                                                                                      else ""))
    return out


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """A directory written beside ``out`` (same file system) and renamed to it only once the block finishes: an
    error or an interruption leaves neither ``out`` nor the stage behind."""
    out = check_out_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise StemmaError(f"cannot write to {out.parent}: {e.strerror}") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old content or all of the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class FsckReport:
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    checked: int = 0
    temporaries: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    """Registry rows that contradict each other (filled by `stemma.workspace.Workspace.fsck`)."""
    stale_locks: list[str] = field(default_factory=list)
    """Locks whose holder looks gone: harmless (the next one to want them takes them over), listed for the record."""

    @property
    def clean(self) -> bool:
        return not (self.corrupt or self.missing or self.orphans or self.inconsistent)


class BlobStore:
    """Blobs on the local filesystem, addressed by sha256."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise StoreError(f"not a sha256 digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        target = self.path(digest)
        if not target.exists():
            atomic_write_bytes(target, data)
        return digest

    def put_json(self, obj: Any) -> str:
        return self.put_bytes(canonical_json(obj))

    def put_file(self, src: Path) -> str:
        """Copy a file into the store, hashing while copying; returns its digest."""
        src = Path(src)
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            target = self.path(digest)
            if target.exists():
                Path(tmp).unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
            return digest
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, digest: str, verify: bool = True) -> bytes:
        p = self.path(digest)
        if not p.is_file():
            raise StoreError(f"blob {digest[:12]} is missing from the store ({p}); run `stemma fsck`")
        data = p.read_bytes()
        if verify and sha256_bytes(data) != digest:
            raise StoreError(f"blob {digest[:12]} is corrupt (content does not hash to its name); run `stemma fsck`")
        return data

    def get_json(self, digest: str) -> Any:
        return json.loads(self.get_bytes(digest))

    def verified_path(self, digest: str) -> Path:
        """Path of a blob after checking that its bytes still hash to its name."""
        p = self.path(digest)
        if not p.is_file():
            raise StoreError(f"blob {digest[:12]} is missing from the store ({p}); run `stemma fsck`")
        if sha256_file(p) != digest:
            raise StoreError(f"blob {digest[:12]} is corrupt (content does not hash to its name); run `stemma fsck`")
        return p

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def iter_digests(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.exists():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if f.name.startswith(".tmp-"):
                    continue
                yield sub.name + f.name

    def fsck(self, referenced: set[str]) -> FsckReport:
        """Re-hash every blob; report corrupt ones, referenced-but-missing ones and unreferenced ones."""
        report = FsckReport()
        present = set()
        for digest in self.iter_digests():
            present.add(digest)
            report.checked += 1
            if sha256_file(self.path(digest)) != digest:
                report.corrupt.append(digest)
        report.missing = sorted(referenced - present)
        report.orphans = sorted(present - referenced)
        for tmp in (self.root).rglob(".tmp-*"):
            report.temporaries.append(str(tmp))
        return report
