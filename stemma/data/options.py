"""How a corpus becomes a dataset: the options `stemma.yaml`'s datasets and `stemma data ingest` both give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IngestOptions:
    """Every field but ``strict`` is part of the dataset's identity."""

    name: str
    """Dataset name; new content under the same name makes its next version."""
    license: str | None = None
    """Licence of the corpus (an SPDX expression); a JSONL document's own ``license`` field wins for it."""
    language: str | None = None
    """Language code of the corpus (``en``, ``de``), or ``multi``."""
    domain: str | None = None
    """Domain the corpus belongs to (``software``, ``legal``)."""
    description: str | None = None
    """Free text for the datasheet."""
    test_fraction: float = 0.05
    """Share of documents held out for the test split (chosen by hash of the text as read)."""
    max_doc_chars: int = 16000
    """Longer documents are cut at paragraph boundaries into pieces of at most this size."""
    steps: tuple[Any, ...] = ()
    """The curation steps in order (`stemma.data.curate.StepSpec`s from `parse_steps`); empty: exact deduplication."""
    strict: bool = False
    """Stop at the first bad input (binary or empty file, bad line) instead of reporting it and going on. Not part of
    the identity: a strict run that succeeds reads exactly what a lenient one does."""
