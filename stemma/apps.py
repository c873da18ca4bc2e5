"""Apps: a prompt template bound to a node, served through the OpenAI API as model ``app:NAME``.

A template is UTF-8 text with one ``{prompt}`` placeholder (``{{`` and ``}}`` write literal braces): a completion's
prompt, or a chat's last user message, is put in its place. An app names a node (its current version answers) or
``auto`` with the API's requirements (language, domain, memory, latency: the selector chooses per request).

An app is *suspended* while the version that answers for it is reached by an active risk flag: that is computed
from the flags each time (`stemma.risk.affected`), never stored, so clearing the flag resumes it. An ``auto`` app is
not suspended: the selector leaves flagged candidates out.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from .errors import StemmaError
from .registry.tables import App
from .risk import FlagInfo
from .settings import actor
from .workspace import Workspace

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MAX_TEMPLATE = 20000  # characters: the column's size
REQUIREMENTS = ("language", "domain", "memory_bytes", "latency_ms")


@dataclass(frozen=True)
class AppInfo:
    name: str
    node: str | None
    """None: ``auto`` (``requirements`` choose the node per request)."""
    requirements: dict
    template: str
    description: str | None
    created_by: str
    created_at: datetime
    version_id: str | None = None
    """The version answering now (the node's current one); None for ``auto``."""
    flags: tuple[FlagInfo, ...] = ()
    """The active flags reaching that version: the app is suspended while there are any."""

    @property
    def status(self) -> str:
        return "suspended" if self.flags else "active"

    @property
    def model(self) -> str:
        return f"app:{self.name}"


def check_template(text: str) -> None:
    """Refuse a template unless ``{prompt}`` is its one placeholder, present once, with no conversion or format."""
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise StemmaError(f"the template is not a valid template ({e}); write {{{{ and }}}} for literal braces") \
            from None
    others = sorted({f"{{{f}}}" for f, _, _ in fields if f != "prompt"})
    if others:
        raise StemmaError(f"the template may only use the {{prompt}} placeholder, not {', '.join(others)} "
                          "(write {{ and }} for literal braces)")
    if len(fields) != 1:
        raise StemmaError(f"the template must contain {{prompt}} exactly once (it has it {len(fields)} times)")
    if fields[0][1] or fields[0][2]:
        raise StemmaError("write the placeholder as {prompt}, without a conversion or format")


def render(template: str, prompt: str) -> str:
    """The template with the prompt in place of ``{prompt}``."""
    return template.format(prompt=prompt)


def read_template(path: Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise StemmaError(f"cannot read template {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StemmaError(f"template {path} is not UTF-8 text (byte {e.start})") from None
    if len(text) > MAX_TEMPLATE:
        raise StemmaError(f"template {path} has {len(text)} characters; at most {MAX_TEMPLATE}")
    check_template(text)
    return text


def _requirements(ws: Workspace, node: str, requirements: dict | None) -> dict:
    reqs = {k: v for k, v in (requirements or {}).items() if v is not None}
    unknown = sorted(set(reqs) - set(REQUIREMENTS))
    if unknown:
        raise StemmaError(f"unknown requirement(s) {', '.join(unknown)}; known: {', '.join(REQUIREMENTS)}")
    if node != "auto":
        if reqs:
            raise StemmaError(f"--language, --domain, --memory and --latency apply to --node auto only, not {node}")
        return {}
    if "domain" in reqs and "language" not in reqs:
        raise StemmaError("a domain needs its language (--language)")
    if "language" in reqs and ws.node(reqs["language"]) is None:
        raise StemmaError(f"no node for language {reqs['language']!r}; see `stemma tree`")
    for k in ("memory_bytes", "latency_ms"):
        if k in reqs and not reqs[k] > 0:
            raise StemmaError(f"{k} must be positive")
    return reqs


def register(ws: Workspace, name: str, node: str, template: Path, description: str | None = None,
             requirements: dict | None = None, replace: bool = False, by: str | None = None) -> AppInfo:
    """Check everything, then write one row (a refused register writes nothing)."""
    if not NAME.match(name):
        raise StemmaError(f"app name {name!r} must start with a letter and hold only letters, digits, _ and - "
                          "(at most 64)")
    if node != "auto":
        n = ws.node(node)
        if n is None or not n.current_version:
            raise StemmaError(f"unknown node {node!r}; see `stemma tree` (or --node auto)")
    reqs = _requirements(ws, node, requirements)
    text = read_template(template)
    if description is not None and len(description) > 2000:
        raise StemmaError("the description has more than 2000 characters")
    with ws.db.session() as s:
        row = s.get(App, name)
        if row is not None and not replace:
            raise StemmaError(f"app {name} exists (bound to {row.node_path or 'auto'}); pass --replace to replace it")
        if row is None:
            row = App(name=name)
            s.add(row)
        row.node_path = None if node == "auto" else node
        row.requirements = reqs or None
        row.template, row.description, row.created_by = text, description, by or actor()
    return get(ws, name)


def apps(ws: Workspace, flags: dict[str, list[FlagInfo]] | None = None) -> list[AppInfo]:
    """Every app with its status; ``flags`` is `stemma.risk.affected`'s answer (read here when None)."""
    from .risk import affected

    with ws.db.session() as s:
        rows = list(s.scalars(select(App).order_by(App.name)))
    if not rows:
        return []
    flags = affected(ws) if flags is None else flags
    current = {n.path: n.current_version for n in ws.nodes()}
    out = []
    for r in rows:
        vid = current.get(r.node_path) if r.node_path else None
        out.append(AppInfo(r.name, r.node_path, dict(r.requirements or {}), r.template, r.description, r.created_by,
                           r.created_at, vid, tuple(flags.get(vid, ())) if vid else ()))
    return out


def get(ws: Workspace, name: str, flags: dict[str, list[FlagInfo]] | None = None) -> AppInfo:
    with ws.db.session() as s:
        if s.get(App, name) is None:
            raise StemmaError(f"no app {name!r}; see `stemma app list`")
    return next(a for a in apps(ws, flags) if a.name == name)
