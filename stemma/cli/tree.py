"""The tree verbs: init, build, tree, show, lineage, export, fsck."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..lineage import row_parents
from .app import app
from .console import err, human_bytes, human_params, open_ws, out


@app.command()
def init() -> None:
    """Create STEMMA_HOME: the registry and the blob store."""
    from ..workspace import Workspace

    ws = Workspace.init()
    out.print(f"stemma home ready at {ws.settings.home} (registry {ws.db.engine.url.render_as_string()})")


@app.command()
def build(
    spec: Path = typer.Argument(Path("stemma.yaml"), help="The tree as code."),
    node: list[str] = typer.Option(None, "--node", help="Build only these nodes (and their ancestors)."),
    footprint: bool = typer.Option(True, "--footprint/--no-footprint",
                                   help="Measure each version's memory and speed once (a child process each)."),
    executor: str = typer.Option("local", "--executor", help="Where dataset curation runs: local (processes) or ray."),
    workers: int = typer.Option(None, "--workers", help="Curation worker processes (default: every core)."),
    nproc: int = typer.Option(None, "--nproc", help="Train data-parallel in this many processes on this machine "
                              "(pretrain, distill, finetune, lora, sft); under torchrun, its processes are used."),
) -> None:
    """Reconcile the registry to stemma.yaml: build only what changed."""
    import time

    from .. import distributed
    from ..build import build as run_build
    from ..data.curate.pipeline import make_executor
    from ..errors import StemmaError
    from ..progress import RichReporter
    from ..spec import load_spec
    from ..train.parallel import World
    from ..workspace import Workspace

    world = World.from_env()
    if nproc is not None and world.size > 1 and nproc != world.size:
        raise StemmaError(f"--nproc {nproc} under a launcher that started {world.size} processes; drop --nproc")
    if nproc is not None and nproc > 1 and world.size == 1:  # the processes are started here, each runs this command
        args = ["build", str(spec), *[a for n in node or [] for a in ("--node", n)],
                "--footprint" if footprint else "--no-footprint", "--executor", executor,
                *(["--workers", str(workers)] if workers is not None else [])]
        raise typer.Exit(distributed.launch(nproc, args))
    tree = load_spec(spec)
    world.start()
    if not world.is_main:
        raise typer.Exit(distributed.follow(world, tree))
    ws = Workspace.init()
    t0 = time.perf_counter()
    ex = make_executor(executor, workers)
    try:
        with distributed.lead(world):
            events = run_build(ws, tree, reporter=RichReporter(err), only=node or None, footprint=footprint,
                               executor=ex)
    finally:
        ex.close()
    built = sum(e.action in ("built", "rebased") for e in events)
    for e in events:
        out.print(f"  {e.action:7} {e.node:28} {e.version[:12]}  {e.seconds:7.1f}s")
    out.print(f"{built} built, {len(events) - built} reused in {time.perf_counter() - t0:.1f}s")


@app.command()
def tree(
    metric: str = typer.Option(None, "--metric", help="A task metric (chrf, accuracy, ...): each node's score on its "
                               "own tasks against its parent, and on its parent's tasks."),
    as_json: bool = typer.Option(False, "--json", help="Every row with every column (and --metric's scores) as one "
                                 "JSON document on stdout."),
) -> None:
    """The tree: node, layer, relation, size, perplexity on its own and its parent's split, status."""
    from ..licenses import licensing
    from ..lineage import tree_rows
    from ..risk import reach

    if metric is not None:
        _check_metric(metric)
    if metric is not None and not as_json:
        _task_tree(metric)
        return
    ws = open_ws()
    rows = tree_rows(ws)
    flags = reach(ws)  # one query for every node
    sources: dict = {}  # each version's own licence sources, read once for the whole tree
    licences = [licensing(ws, r.version.id, sources) if r.version else None for r in rows]
    if as_json:
        _tree_json(ws, rows, flags, licences, metric)
        return
    if not rows:
        out.print("the registry is empty; run `stemma build`")
        return
    names = _names(rows)
    t = Table("node", "layer", "relation", "version", "params", "bytes", "ppl own split (vs parent)",
              "parent on own split", "ppl parent split (forgetting)", "parent on its split", "licence", "status",
              title="stemma tree", caption="perplexity on held-out test splits; lower is better; licence: the one "
              "the licence obligations of the lineage imply, or ? and the kinds that need --license to release")
    _keep_whole(t.columns[0], names)
    for r, name, lic in zip(rows, names, licences):
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        gain = "" if r.gain is None else f" ({r.gain:+.0%})"
        forg = "" if r.forgetting is None else f" ({r.forgetting:+.1%})"
        t.add_row(
            name, r.layer, r.relation or "-", r.version.short if r.version else "-",
            human_params(r.params), human_bytes(r.bytes), fmt(r.ppl_own) + gain, fmt(r.parent_ppl_own),
            fmt(r.ppl_parent_split) + forg, fmt(r.parent_ppl_parent_split), lic.summary if lic else "-",
            {"ok": "[green]ok[/green]", "stale": "[yellow]stale[/yellow]"}.get(r.status, f"[red]{r.status}[/red]")
            + _risk_mark(flags.get(r.version.id) if r.version else None),
        )
    out.print(t)


def _names(rows) -> list[str]:
    """The node column: each node's own name indented under its parent (``python`` under ``en/software``), or its
    full path where the name alone would not say it (a root, or a path that does not extend its parent's)."""
    out = []
    for r, parent in zip(rows, row_parents(rows)):
        own = r.path[len(parent) + 1:] if parent and r.path.startswith(parent + "/") else r.path
        out.append("  " * r.depth + own)
    return out


def _keep_whole(column, cells: list[str]) -> None:
    """A node name is never wrapped nor cut to an ellipsis (``en/so…`` could be several nodes): the other columns
    give way; on a console too narrow even for it, it folds rather than loses characters."""
    column.no_wrap = True
    column.min_width = max(map(len, cells))
    column.overflow = "fold"


def _tree_json(ws, rows, flags, licences, metric: str | None) -> None:
    """`stemma tree --json`: one document, every row with every column, numbers unrounded."""
    tasks = {}
    if metric is not None:
        from ..evaluate.suites import task_rows

        tasks = {t.path: t for t in task_rows(ws, metric)}

    def cell(c) -> dict:
        return {"task": c.task, "value": c.value, "parent_value": c.parent_value, "change": c.change,
                "better": c.better}

    doc_rows = []
    for r, parent, lic in zip(rows, row_parents(rows), licences):
        reached = flags.get(r.version.id) if r.version else None
        row = {
            "node": r.path, "parent": parent, "depth": r.depth, "layer": r.layer, "relation": r.relation,
            "version": r.version.id if r.version else None, "params": r.params, "own_params": r.own_params,
            "bytes": r.bytes,
            "perplexity": {"own_split": r.ppl_own, "parent_on_own_split": r.parent_ppl_own,
                           "parent_split": r.ppl_parent_split, "parent_on_parent_split": r.parent_ppl_parent_split},
            "gain": r.gain, "forgetting": r.forgetting, "status": r.status,
            "flags": [] if reached is None else [{"id": f.id, "severity": f.severity, "reason": f.reason,
                                                  "direct": f.id in reached.direct} for f in reached.flags],
            "flag_mark": reached.mark if reached else None,
            "licence": None if lic is None else {"summary": lic.summary, **lic.as_dict()},
        }
        if metric is not None:
            t = tasks.get(r.path)
            row["metric"] = {"name": metric, "own_tasks": [cell(c) for c in t.own] if t else [],
                             "parent_tasks": [cell(c) for c in t.parents] if t else []}
        doc_rows.append(row)
    typer.echo(json.dumps({"metric": metric, "rows": doc_rows}, indent=2, default=str))


def _risk_mark(r) -> str:
    """``flagged #1`` (a flag names the version or its training data) or ``affected #1`` (through an ancestor), on a
    line of its own in the status cell."""
    if r is None:
        return ""
    return f"\n[bold red]{r.mark} {','.join(f'#{f.id}' for f in r.flags)}[/bold red]"


def _check_metric(metric: str) -> None:
    from ..errors import StemmaError
    from ..evaluate.suites import known_metric
    from ..evaluate.tasks import all_metrics

    if not known_metric(metric):
        raise StemmaError(f"unknown metric {metric!r} (task metrics: {', '.join(sorted(all_metrics()))})")


def _task_tree(metric: str) -> None:
    """`stemma tree --metric M`: the task scores of M, like the perplexity columns (gain and forgetting)."""
    from ..evaluate.suites import task_rows
    from ..evaluate.tasks import all_metrics

    rows = task_rows(open_ws(), metric)
    if not rows:
        out.print("the registry is empty; run `stemma build`")
        return
    fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731

    def cells(cs) -> tuple[str, str]:
        if not cs:
            return "-", "-"
        mine, theirs = [], []
        for c in cs:
            change = "" if c.change is None else f" ({c.change:+.3g})"
            colour = {True: "green", False: "red"}.get(c.better)
            mine.append(f"{c.task} {fmt(c.value)}" + (f"[{colour}]{change}[/{colour}]" if colour else change))
            theirs.append(f"{c.task} {fmt(c.parent_value)}")
        return "\n".join(mine), "\n".join(theirs)

    higher = all_metrics()[metric]
    t = Table("node", "version", f"{metric} on own tasks (vs parent)", "parent on own tasks",
              f"{metric} on parent's tasks (vs parent)", "parent on its tasks", title=f"stemma tree: {metric}",
              caption=f"{'higher' if higher else 'lower'} is better; green: better than the parent, red: worse")
    names = _names(rows)
    _keep_whole(t.columns[0], names)
    for r, name in zip(rows, names):
        own, pown = cells(r.own)
        par, ppar = cells(r.parents)
        t.add_row(name, r.version or "-", own, pown, par, ppar)
    out.print(t)


@app.command()
def show(ref: str = typer.Argument(..., help="node, node@version-prefix, or version id prefix")) -> None:
    """One version: manifest, parent, recipe, datasets, metrics."""
    ws = open_ws()
    v = ws.resolve_version(ref)
    ds = ws.version_datasets(v.id)
    metrics = [{"name": m.name, "dataset": m.dataset_id[:12] if m.dataset_id else None, "split": m.split,
                "value": round(m.value, 4)} for m in ws.metrics_of(v.id)]
    from ..evaluate.suites import task_summary
    from ..licenses import licensing

    doc = {"id": v.id, "node": v.row.node_path, "created_at": v.row.created_at.isoformat(), "bytes": v.row.bytes,
           "datasets": {role: {"id": d, "name": ws.resolve_dataset(d).name} for role, d in ds.items()},
           "metrics": metrics, "tasks": task_summary(ws, v.id), "flags": _flags_of(ws, v.id),
           "licenses": licensing(ws, v.id).as_dict(), "manifest": v.manifest}
    out.print_json(json.dumps(doc, default=str))


def _flags_of(ws, version_id: str) -> list[dict]:
    """The active flags reaching a version, each marked ``direct`` (on it or its data) or through an ancestor."""
    from ..risk import reach

    r = reach(ws).get(version_id)
    if r is None:
        return []
    return [{"id": f.id, "severity": f.severity, "reason": f.reason, "target": f"{f.target_kind} {f.target_name}",
             "by": f.created_by, "at": f.created_at.isoformat(), "direct": f.id in r.direct} for f in r.flags]


@app.command()
def lineage(ref: str) -> None:
    """The chain from the master down to a version, with relations and content hashes."""
    ws = open_ws()
    v = ws.resolve_version(ref)
    chain = ws.chain(v.id)
    for i, c in enumerate(chain):
        arrow = "" if i == 0 else "  " * (i - 1) + "└─"
        files = ", ".join(f"{n}:{d[:8]}" for n, d in sorted(c.manifest["files"].items()))
        out.print(f"{arrow}{c.row.node_path} [bold]{c.id[:12]}[/bold]  {c.row.relation} ({c.row.method})  "
                  f"tokenizer {c.row.tokenizer[:8]}  files {files}", highlight=False)


@app.command()
def export(
    ref: str = typer.Argument(..., help="node or node@version"),
    out_dir: Path = typer.Option(..., "--out", help="Directory to create."),
    fmt: str = typer.Option("merged", "--format", help="merged (full HF model) or adapter (PEFT dir + base/)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Write a version as a plain Hugging Face directory (merged) or a PEFT adapter directory."""
    from ..export import export as run_export

    path = run_export(open_ws(), ref, out_dir, fmt=fmt, force=force)
    out.print(f"exported {ref} ({fmt}) to {path}")


@app.command()
def fsck() -> None:
    """Re-hash every blob; report corrupt, missing and orphan blobs, registry rows that contradict each other
    and stale locks."""
    ws = open_ws()
    r = ws.fsck()
    for d in r.corrupt:
        out.print(f"[red]corrupt[/red] {d}")
    for d in r.missing:
        out.print(f"[red]missing[/red] {d}")
    for d in r.orphans:
        out.print(f"[yellow]orphan[/yellow]  {d}")
    for line in r.inconsistent:
        out.print(f"[red]inconsistent[/red] {line}")
    for line in r.stale_locks:
        out.print(f"[yellow]stale[/yellow]   {line}")
    out.print(f"{r.checked} blobs checked: {len(r.corrupt)} corrupt, {len(r.missing)} missing, "
              f"{len(r.orphans)} orphan; registry: {len(r.inconsistent)} inconsistent")
    if not r.clean:
        raise typer.Exit(1)
