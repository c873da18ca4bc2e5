"""Progress reporting that the core can call without knowing about terminals.

The CLI hands in a `RichReporter` (rich progress bars with loss and tokens/s); tests and library users get
`NullReporter`. Only work longer than about a second reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: float = 1, **fields: str) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: float | None) -> Iterator[Task]: ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: float = 1, **fields: str) -> None:
        pass


class NullReporter:
    @contextmanager
    def task(self, description: str, total: float | None):
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


class _RichTask:
    def __init__(self, progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1, **fields: str) -> None:
        self._p.update(self._id, advance=n, info=fields.get("info", ""))


class RichReporter:
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: float | None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=self.console, transient=False) as p:
            tid = p.add_task(description, total=total, info="")
            yield _RichTask(p, tid)

    def log(self, message: str) -> None:
        self.console.print(message)
