"""One registry of named plug-ins, for every kind stemma has: build methods, model families, aggregation strategies,
curation steps, evaluation task kinds.

Each kind keeps a `Registry` and exposes its ``register`` / ``get`` / ``names``; a plug-in registers itself when its
module is imported, and a catalogue module imports the built-in ones (mergekit's and PEFT's method registries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind by name. ``get`` of an unknown name raises ``error`` naming the known ones."""

    def __init__(self, what: str, key: Callable[[T], str], error: type[Exception]):
        self.what, self.key, self.error = what, key, error
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        """Decorator (or call): make ``item`` available under its key; a second, different item is an error."""
        name = self.key(item)
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self.error(f"unknown {self.what} {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())
