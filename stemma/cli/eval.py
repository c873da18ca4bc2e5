"""The evaluation verbs: eval (a node's task suites, or lm-evaluation-harness tasks) and check (its release gate)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .app import app
from .console import err, open_ws, out


@app.command("eval")
def eval_(
    node: str = typer.Argument(..., help="node, node@version-prefix, or version id prefix"),
    suite: str = typer.Option(None, "--suite", help="Only the tasks of this suite (as recorded by `stemma build`)."),
    harness: str = typer.Option(None, "--harness", help="lm-evaluation-harness task names, comma-separated."),
    include_path: Path = typer.Option(None, "--include-path", help="A directory of lm-eval task YAMLs."),
    limit: int = typer.Option(None, "--limit", help="lm-eval: only the first N samples of each task."),
) -> None:
    """Score a node on its tasks (its parent on them, and it on its parent's tasks), or run lm-eval tasks on it."""
    from ..progress import RichReporter

    ws = open_ws()
    v = ws.resolve_version(node)
    if harness is not None:
        from ..evaluate.harness import run_harness

        scores = run_harness(ws, v.id, harness.split(","), include_path=include_path, limit=limit)
        t = Table("metric", "value", title=f"lm-eval on {v.label}")
        for name, value in scores.items():
            t.add_row(name, f"{value:.4f}")
        out.print(t)
        return
    from ..errors import StemmaError
    from ..evaluate.runner import evaluate_version
    from ..evaluate.suites import recorded_suites, recorded_tasks

    if suite is not None and suite not in recorded_suites(ws, v.row.node_path):
        known = ", ".join(recorded_suites(ws, v.row.node_path)) or "none recorded: declare eval: and build"
        raise StemmaError(f"node {v.row.node_path} has no suite {suite!r} (suites: {known})")
    if not recorded_tasks(ws, v.row.node_path):
        raise StemmaError(f"node {v.row.node_path} has no evaluation tasks; give it eval: suites in stemma.yaml and "
                          "run `stemma build`")
    scores = evaluate_version(ws, v, reporter=RichReporter(err), suite=suite)
    t = Table("task", "metric", "value", title=v.label)
    for tid, metrics in scores.items():
        for m, value in metrics.items():
            t.add_row(tid, m, f"{value:.4f}")
    out.print(t)


@app.command()
def check(node: str = typer.Argument(..., help="the node whose current version is checked")) -> None:
    """Judge a node's current version by its release gate: each threshold, pass or fail (exit 1 on fail)."""
    from ..evaluate.gate import judge

    ws = open_ws()
    gate, lines = judge(ws, node)
    if gate is None:
        out.print(f"{node}: no release gate declared: pass")
        return
    for t in lines:
        out.print(f"  {'[green]pass[/green]' if t.ok else '[red]FAIL[/red]'}  {t.reason}", highlight=False)
    failed = sum(not t.ok for t in lines)
    if failed:
        out.print(f"{node}: [red]fail[/red] ({failed} of {len(lines)} thresholds)", highlight=False)
        raise typer.Exit(1)
    out.print(f"{node}: [green]pass[/green] ({len(lines)} thresholds)", highlight=False)
