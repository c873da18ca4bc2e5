"""Where stemma keeps its state.

Everything lives under STEMMA_HOME (default ``~/.stemma``): the registry (a SQLite file unless
STEMMA_REGISTRY_URL names another database, e.g. ``postgresql+psycopg://user@host/db``), the blob store and
the work area that holds resumable training checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    """Root directory of this stemma installation."""
    registry_url: str
    """SQLAlchemy URL of the registry database."""

    @property
    def store_dir(self) -> Path:
        """Content-addressed blobs (weights, manifests, tokenizers, dataset shards)."""
        return self.home / "store"

    @property
    def work_dir(self) -> Path:
        """Scratch space: one directory per in-flight build, holding its checkpoints."""
        return self.home / "work"


def load_settings(home: str | Path | None = None) -> Settings:
    """Read settings from the environment (STEMMA_HOME, STEMMA_REGISTRY_URL)."""
    root = Path(home or os.environ.get("STEMMA_HOME") or Path.home() / ".stemma").expanduser().absolute()
    url = os.environ.get("STEMMA_REGISTRY_URL") or f"sqlite:///{root / 'registry.db'}"
    return Settings(home=root, registry_url=url)


def actor() -> str:
    """Who is acting, as records of flags, revocations, apps and releases name them: ``STEMMA_USER`` if set, else
    the login name."""
    import getpass

    return os.environ.get("STEMMA_USER") or getpass.getuser()


def when(t) -> str:
    """A registry timestamp (UTC) as every message and table prints it; ``-`` for none."""
    return f"{t:%Y-%m-%d %H:%M} UTC" if t is not None else "-"
