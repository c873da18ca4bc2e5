"""Ingest text files, directories and JSONL into an immutable, content-addressed dataset.

A dataset is two canonical JSONL blobs (train, test) plus a datasheet, tied together by a manifest whose
sha256 is the dataset id. Reading, the split and the curation steps are `stemma.data.read` and
`stemma.data.curate`; this module turns their outputs into the manifest. The split is decided per document by the
hash of its text as read, so it is deterministic and stable: adding documents never moves an existing one between
train and test, and the steps know each document's split (a near-duplicate of a test document is leakage).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .curate.pipeline import Curated, Curation, work_key
from .options import IngestOptions
from .read import ReadOptions

__all__ = ["BuiltDataset", "IngestOptions", "build_dataset", "built_from", "curation_for", "manifest_of", "read_docs",
           "validate_dataset_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def validate_dataset_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise DataError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' (no slashes)")
    return name


@dataclass
class BuiltDataset:
    """A curated corpus not yet in the store: the manifest and the two split files it names."""

    manifest: dict[str, Any]
    train_path: Path
    test_path: Path
    run: dict[str, Any] = field(default_factory=dict)
    """Facts of this run (seconds, MB/s per step, executor): in the registry's datasheet, not in the identity."""
    _tmp: Any = None  # keeps a temporary work directory alive as long as the object

    @property
    def datasheet(self) -> dict[str, Any]:
        return self.manifest["datasheet"]

    @property
    def train(self) -> bytes:
        return self.train_path.read_bytes()

    @property
    def test(self) -> bytes:
        return self.test_path.read_bytes()


def manifest_of(opts: IngestOptions, cur: Curated) -> dict[str, Any]:
    """The dataset's manifest: everything that decides its content, and nothing of how long it took."""
    licenses = cur.licenses
    datasheet = {
        "name": opts.name,
        "description": opts.description,
        "license": opts.license or (next(iter(licenses)) if len(licenses) == 1 else "mixed"),
        "licenses": licenses,
        "language": opts.language,
        "domain": opts.domain,
        "sources": cur.files,
        "skipped_files": [f["file"] for f in cur.files if f["status"] == "skipped"],
        "curation": cur.steps,
        "counts": cur.counts,
        "split": {"method": "sha256(text as read) < test_fraction", "test_fraction": opts.test_fraction},
        "max_doc_chars": opts.max_doc_chars,
    }
    return {"kind": "dataset", "schema": 2, "name": opts.name, "train": cur.train_sha256, "test": cur.test_sha256,
            "datasheet": datasheet}


def curation_for(paths: list[Path], opts: IngestOptions, work_dir: Path, executor=None, reporter=None) -> Curation:
    """The resumable curation of one corpus in ``work_dir/<key of its inputs and options>``."""
    validate_dataset_name(opts.name)
    key = work_key(paths, opts, ReadOptions(max_doc_chars=opts.max_doc_chars))
    return Curation(paths, opts, Path(work_dir) / key, executor=executor, reporter=reporter)


def built_from(opts: IngestOptions, cur: Curation, references: tuple[str, ...] = ()) -> BuiltDataset:
    out = cur.run(references)
    return BuiltDataset(manifest=manifest_of(opts, out), train_path=out.train_path, test_path=out.test_path,
                        run={**out.run, "references": out.references})


def build_dataset(paths: list[Path], opts: IngestOptions, work_dir: Path | None = None, executor=None,
                  references: tuple[str, ...] = (), reporter=None) -> BuiltDataset:
    """Read, curate and split a corpus into files under ``work_dir`` (resumable); nothing is registered.

    Without ``work_dir`` the run happens in a temporary directory that lives as long as the returned object."""
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="stemma-ingest-")
        work_dir = Path(tmp.name)
    cur = curation_for(paths, opts, work_dir, executor=executor, reporter=reporter)
    built = built_from(opts, cur, references)
    built._tmp = tmp
    return built


def read_docs(blob: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in blob.decode().splitlines() if line]
