"""The one error type users see.

Every failure a user can cause (bad input, a missing file, a corrupt blob) raises `StemmaError` with a
message that fits on one line; the CLI prints it and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


class StemmaError(Exception):
    """A user-facing error whose message is a complete, one-line explanation."""


class SpecError(StemmaError):
    """stemma.yaml is invalid (unknown parent, cycle, bad node name, bad config)."""


class DataError(StemmaError):
    """A corpus cannot be ingested (missing file, empty corpus, unreadable JSONL)."""


class StoreError(StemmaError):
    """A blob is missing or does not hash to its name."""


class UnsafeArtifactError(StemmaError):
    """An artefact is in a format that can run code when loaded (pickle); stemma refuses it."""


class TokenizerMismatchError(StemmaError):
    """Two versions that must share a tokenizer do not."""
