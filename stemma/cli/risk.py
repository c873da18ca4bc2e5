"""The risk verbs: flag, unflag, flags, impact; and apps (app register, app list)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..settings import when
from .app import app, apps_app
from .console import open_ws, out


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
            f"cleared by {escape(f.cleared_by or '-')} at {when(f.cleared_at)}: {escape(f.cleared_reason or '')}"
        t.add_row(str(f.id), f"{f.target_kind} {escape(f.target_name)}", f.severity, escape(f.reason),
                  escape(f.created_by), when(f.created_at), status)
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


@apps_app.command("register")
def app_register(
    name: str = typer.Argument(..., help="The app's name: served as model app:NAME."),
    node: str = typer.Option(..., "--node", help="The node that answers, or auto (chosen per request by the "
                             "requirements below)."),
    template: Path = typer.Option(..., "--template", help="UTF-8 text file with one {prompt} placeholder."),
    description: str = typer.Option(None, "--description", help="What the app is for."),
    language: str = typer.Option(None, "--language", help="With --node auto: the language node, e.g. en."),
    domain: str = typer.Option(None, "--domain", help="With --node auto: the domain, e.g. python."),
    memory: str = typer.Option(None, "--memory", help="With --node auto: peak memory budget, e.g. 300MB."),
    latency: str = typer.Option(None, "--latency", help="With --node auto: time per token budget, e.g. 25ms."),
    replace: bool = typer.Option(False, "--replace", help="Replace an app of that name."),
) -> None:
    """Bind a prompt template to a node, served through the OpenAI API as model app:NAME."""
    from .. import apps
    from ..select import parse_bytes, parse_ms

    reqs = {"language": language, "domain": domain, "memory_bytes": parse_bytes(memory) if memory else None,
            "latency_ms": parse_ms(latency) if latency else None}
    a = apps.register(open_ws(), name, node, template, description=description, requirements=reqs, replace=replace)
    out.print(f"app {a.name} ({a.model}) bound to {_bound(a)}: {a.status}"
              + (f", {'; '.join(f.label for f in a.flags)}" if a.flags else ""), highlight=False)


def _bound(a) -> str:
    if a.node:
        return a.node
    return "auto" + (f" ({', '.join(f'{k}={v}' for k, v in a.requirements.items())})" if a.requirements else "")


@apps_app.command("list")
def app_list(as_json: bool = typer.Option(False, "--json", help="As JSON.")) -> None:
    """Every app: its node, and whether it is active or suspended by a risk flag."""
    from .. import apps

    rows = apps.apps(open_ws())
    if as_json:
        out.print_json(json.dumps([{"name": a.name, "model": a.model, "node": a.node or "auto",
                                    "requirements": a.requirements, "version": a.version_id, "status": a.status,
                                    "flags": [{"id": f.id, "label": f.label} for f in a.flags],
                                    "description": a.description, "created_by": a.created_by,
                                    "created_at": a.created_at.isoformat()} for a in rows]))
        return
    if not rows:
        out.print("no apps; see `stemma app register`")
        return
    t = Table("app", "node", "status", "description", "registered by", title="stemma apps")
    for a in rows:
        status = "[green]active[/green]" if not a.flags else \
            "[red]suspended[/red]: " + escape("; ".join(f.label for f in a.flags))
        t.add_row(a.model, escape(_bound(a)), status, escape(a.description or "-"), escape(a.created_by))
    out.print(t)
