"""What every verb module shares: the consoles, the workspace, and how sizes are printed."""

from __future__ import annotations

import sys

from rich.console import Console

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


def open_ws():
    """The workspace at STEMMA_HOME (it must exist: `stemma init`)."""
    from ..workspace import Workspace

    return Workspace.open()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"
