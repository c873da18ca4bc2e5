"""Reading a config mapping from stemma.yaml into its dataclass, with one-line errors.

Build methods, gates and rebase settings are frozen dataclasses documented field by field; this is the one
place that validates a mapping against them (pydantic for the types, unknown keys named with the known ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import SpecError


def parse_dataclass(cls: type, raw: dict[str, Any] | None, where: str, what: str = "config") -> Any:
    """``cls(**raw)`` validated: unknown fields and bad types raise `SpecError` naming ``where`` and the field."""
    from pydantic import TypeAdapter, ValidationError

    if raw is not None and not isinstance(raw, dict):
        raise SpecError(f"{where}: {what} must be a mapping, got {type(raw).__name__}")
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{where}: unknown {what} field(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(sorted(known))})")
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SpecError(f"{where}: {what} field {loc}: {err['msg']}") from None
