"""The `stemma` command: one thin module per verb group; the work happens in the library."""

from __future__ import annotations

import sys

from ..errors import StemmaError
from . import data, deploy, device, eval, release, risk, serve, tree, update  # noqa: F401 - each module adds its commands to the app
from .app import app
from .console import err


def main() -> None:
    try:
        app()
    except StemmaError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main"]
