"""The risk verbs: flag, unflag, flags, impact; and apps (app register, app list)."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from .app import app
from .console import open_ws, out


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t is not None else "-"


@app.command()
def flag(
    ref: str = typer.Argument(..., help="A dataset or version: name, name@pin, id prefix, dataset:REF or version:REF."),
    reason: str = typer.Option(..., "--reason", help="Why (licence, poisoning, vulnerability, bias...)."),
    severity: str = typer.Option(..., "--severity", help="low, high or critical."),
) -> None:
    """Flag a dataset or a version: the flag reaches every version derived from it."""
    from .. import risk

    ws = open_ws()
    info = risk.flag(ws, ref, reason=reason, severity=severity)
    _, reached = risk.impact(ws, f"{info.target_kind}:{info.target_id}")
    hits = sorted({a.node for a in reached})
    out.print(f"flag #{info.id} ({info.severity}) on {info.target_kind} {escape(info.target_name)} by "
              f"{escape(info.created_by)}: reaches {len(hits)} node(s): {', '.join(hits) or '-'}", highlight=False)


@app.command()
def unflag(
    ref: str = typer.Argument(..., help="A flag number (#3) or a dataset or version: every active flag on it."),
    reason: str = typer.Option(..., "--reason", help="Why the flag is cleared."),
) -> None:
    """Clear flags (they stay in the history with who cleared them, when and why)."""
    from .. import risk

    for f in risk.unflag(open_ws(), ref, reason=reason):
        out.print(f"cleared flag #{f.id} on {f.target_kind} {escape(f.target_name)} by {escape(f.cleared_by)}",
                  highlight=False)


@app.command()
def flags(include_cleared: bool = typer.Option(False, "--all", help="Cleared flags too (the whole history).")) -> None:
    """Active flags (with --all: every flag ever set), with who set them, when and why."""
    from .. import risk

    rows = risk.flags(open_ws(), include_cleared=include_cleared)
    if not rows:
        out.print("no flags" if include_cleared else "no active flags")
        return
    t = Table("#", "target", "severity", "reason", "flagged by", "at", "status", title="stemma flags")
    for f in rows:
        status = "[red]active[/red]" if f.active else \
            f"cleared by {escape(f.cleared_by or '-')} at {_when(f.cleared_at)}: {escape(f.cleared_reason or '')}"
        t.add_row(str(f.id), f"{f.target_kind} {escape(f.target_name)}", f.severity, escape(f.reason),
                  escape(f.created_by), _when(f.created_at), status)
    out.print(t)


@app.command()
def impact(
    ref: str = typer.Argument(..., help="A dataset or version: name, id or unambiguous prefix."),
    as_json: bool = typer.Option(False, "--json", help="As JSON."),
) -> None:
    """Every version derived from a dataset or a version, and which nodes' current version is among them."""
    from .. import risk

    ws = open_ws()
    target, reached = risk.impact(ws, ref)
    nodes: dict[str, bool] = {}
    for a in reached:
        nodes[a.node] = nodes.get(a.node, False) or a.current
    if as_json:
        doc = {"target": {"kind": target.kind, "id": target.id, "name": target.name},
               "versions": [{"id": a.version_id, "node": a.node, "relation": a.relation, "current": a.current,
                             "direct": bool(a.direct)} for a in reached],
               "nodes": [{"node": n, "current_affected": cur} for n, cur in sorted(nodes.items())]}
        out.print_json(json.dumps(doc))
        return
    t = Table("node", "version", "relation", "how", "current", title=f"impact of {target.kind} {escape(target.name)}")
    for a in reached:
        how = ("the version itself" if target.kind == "version" else "trained on it") if a.direct else "derived"
        t.add_row(a.node, a.version_id[:12], a.relation, how, "[red]current[/red]" if a.current else "old")
    out.print(t)
    cur = [n for n, c in sorted(nodes.items()) if c]
    out.print(f"{len(reached)} version(s) on {len(nodes)} node(s); current version affected on "
              f"{len(cur)}: {', '.join(cur) or '-'}", highlight=False)
