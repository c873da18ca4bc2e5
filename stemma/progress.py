"""Progress reporting that the core can call without knowing about terminals.

The CLI hands in a `RichReporter` (rich progress bars with loss and tokens/s); tests and library users get
`NullReporter`. Only work longer than about a second reports.
"""

from __future__ import annotations

import time
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


class _LogTask:
    """Plain lines for logs and CI, where a live bar would only appear once the task ends."""

    def __init__(self, console, description: str, total: float | None, every_s: float = 15.0):
        self.console, self.description, self.total, self.every_s = console, description, total, every_s
        self.done = 0.0
        self.t0 = self.last = time.perf_counter()
        self.info = ""

    def advance(self, n: float = 1, **fields: str) -> None:
        self.done += n
        self.info = fields.get("info", self.info)
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.console.print(f"  {self.description}: {self._count()}  {now - self.t0:.0f}s  {self.info}",
                               highlight=False)

    def _count(self) -> str:
        return f"{self.done:.0f}/{self.total:.0f}" if self.total else f"{self.done:.0f}"

    def finish(self) -> None:
        self.console.print(f"  {self.description}: {self._count()} done in {time.perf_counter() - self.t0:.1f}s  "
                           f"{self.info}", highlight=False)


class RichReporter:
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: float | None):
        if not self.console.is_terminal:
            t = _LogTask(self.console, description, total)
            yield t
            t.finish()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=self.console, transient=False) as p:
            tid = p.add_task(description, total=total, info="")
            yield _RichTask(p, tid)

    def log(self, message: str) -> None:
        self.console.print(message)
