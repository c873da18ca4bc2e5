"""The `stemma` command: one thin command per verb; the work happens in the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import StemmaError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Build, track, fit and serve a hierarchy of language models.")
data_app = typer.Typer(no_args_is_help=True, help="Corpora and datasets.")
app.add_typer(data_app, name="data")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


def _ws():
    from .workspace import Workspace

    return Workspace.open()


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _human_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


@app.command()
def init() -> None:
    """Create STEMMA_HOME: the registry and the blob store."""
    from .workspace import Workspace

    ws = Workspace.init()
    out.print(f"stemma home ready at {ws.settings.home} (registry {ws.db.engine.url.render_as_string()})")


@data_app.command("ingest")
def data_ingest(
    paths: list[Path] = typer.Argument(..., help="Text files, directories, or JSONL files (a 'text' field per line)."),
    name: str = typer.Option(..., "--name", help="Dataset name; new content under a name makes its next version."),
    license: str = typer.Option(None, "--license", help="Licence of the corpus (SPDX id)."),
    language: str = typer.Option(None, "--language", help="Language code, e.g. en."),
    domain: str = typer.Option(None, "--domain", help="Domain, e.g. software."),
    test_fraction: float = typer.Option(0.05, "--test-fraction", help="Share of documents held out."),
) -> None:
    """Ingest a corpus into an immutable, content-addressed dataset with a datasheet."""
    from .data.ingest import IngestOptions

    ws = _ws()
    row, new = ws.ingest(paths, IngestOptions(name=name, license=license, language=language, domain=domain,
                                              test_fraction=test_fraction))
    c = row.datasheet["counts"]
    verb = "ingested" if new else "unchanged (already registered)"
    out.print(f"dataset {row.name}@{row.seq} {row.id[:12]} {verb}: {c['documents']} documents "
              f"({c['train_documents']} train / {c['test_documents']} test), "
              f"{c['exact_duplicates_removed']} exact duplicates removed, {c['whitespace_tokens']:,} tokens")


@data_app.command("list")
def data_list() -> None:
    """List datasets."""
    t = Table("name", "seq", "id", "language", "licence", "docs", "train", "test", "tokens")
    for d in _ws().list_datasets():
        t.add_row(d.name, str(d.seq), d.id[:12], d.language or "-", d.license or "-", str(d.n_docs), str(d.n_train),
                  str(d.n_test), f"{d.datasheet['counts']['whitespace_tokens']:,}")
    out.print(t)


@data_app.command("show")
def data_show(ref: str) -> None:
    """Print a dataset's datasheet (JSON)."""
    ws = _ws()
    d = ws.resolve_dataset(ref)
    out.print_json(json.dumps({"id": d.id, "seq": d.seq, **ws.dataset_manifest(d.id)}))


@app.command()
def build(
    spec: Path = typer.Argument(Path("stemma.yaml"), help="The tree as code."),
    node: list[str] = typer.Option(None, "--node", help="Build only these nodes (and their ancestors)."),
    footprint: bool = typer.Option(True, "--footprint/--no-footprint",
                                   help="Measure each version's memory and speed once (a child process each)."),
) -> None:
    """Reconcile the registry to stemma.yaml: build only what changed."""
    import time

    from .build import build as run_build
    from .progress import RichReporter
    from .spec import load_spec
    from .workspace import Workspace

    tree = load_spec(spec)
    ws = Workspace.init()
    t0 = time.perf_counter()
    events = run_build(ws, tree, reporter=RichReporter(err), only=node or None, footprint=footprint)
    built = sum(e.action in ("built", "rebased") for e in events)
    for e in events:
        out.print(f"  {e.action:7} {e.node:28} {e.version[:12]}  {e.seconds:7.1f}s")
    out.print(f"{built} built, {len(events) - built} reused in {time.perf_counter() - t0:.1f}s")


@app.command()
def tree() -> None:
    """The tree: node, layer, relation, size, perplexity on its own and its parent's split, status."""
    from .lineage import tree_rows

    rows = tree_rows(_ws())
    if not rows:
        out.print("the registry is empty; run `stemma build`")
        return
    t = Table("node", "layer", "relation", "version", "params", "bytes", "ppl own split (vs parent)",
              "parent on own split", "ppl parent split (forgetting)", "parent on its split", "status",
              title="stemma tree", caption="perplexity on held-out test splits; lower is better")
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        gain = "" if r.gain is None else f" ({r.gain:+.0%})"
        forg = "" if r.forgetting is None else f" ({r.forgetting:+.1%})"
        t.add_row(
            "  " * r.depth + r.path, r.layer, r.relation or "-", r.version.short if r.version else "-",
            _human_params(r.params), _human_bytes(r.bytes), fmt(r.ppl_own) + gain, fmt(r.parent_ppl_own),
            fmt(r.ppl_parent_split) + forg, fmt(r.parent_ppl_parent_split),
            {"ok": "[green]ok[/green]", "stale": "[yellow]stale[/yellow]"}.get(r.status, f"[red]{r.status}[/red]"),
        )
    out.print(t)


@app.command()
def show(ref: str = typer.Argument(..., help="node, node@version-prefix, or version id prefix")) -> None:
    """One version: manifest, parent, recipe, datasets, metrics."""
    ws = _ws()
    v = ws.resolve_version(ref)
    ds = ws.version_datasets(v.id)
    metrics = [{"name": m.name, "dataset": m.dataset_id[:12] if m.dataset_id else None, "split": m.split,
                "value": round(m.value, 4)} for m in ws.metrics_of(v.id)]
    doc = {"id": v.id, "node": v.row.node_path, "created_at": v.row.created_at.isoformat(), "bytes": v.row.bytes,
           "datasets": {role: {"id": d, "name": ws.resolve_dataset(d).name} for role, d in ds.items()},
           "metrics": metrics, "manifest": v.manifest}
    out.print_json(json.dumps(doc, default=str))


@app.command()
def lineage(ref: str) -> None:
    """The chain from the master down to a version, with relations and content hashes."""
    ws = _ws()
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
    from .export import export as run_export

    path = run_export(_ws(), ref, out_dir, fmt=fmt, force=force)
    out.print(f"exported {ref} ({fmt}) to {path}")


@app.command()
def fsck() -> None:
    """Re-hash every blob; report corrupt, missing and orphan blobs."""
    ws = _ws()
    r = ws.fsck()
    for d in r.corrupt:
        out.print(f"[red]corrupt[/red] {d}")
    for d in r.missing:
        out.print(f"[red]missing[/red] {d}")
    for d in r.orphans:
        out.print(f"[yellow]orphan[/yellow]  {d}")
    out.print(f"{r.checked} blobs checked: {len(r.corrupt)} corrupt, {len(r.missing)} missing, {len(r.orphans)} orphan")
    if not r.clean:
        raise typer.Exit(1)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; non-loopback needs STEMMA_ADMIN_TOKEN."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(None, "--max-batch", help="Sequences decoded together per base model."),
) -> None:
    """Serve the tree over an OpenAI-compatible HTTP API (every node; adapter children batched over their base)."""
    from .serve.config import ServeConfig
    from .serve.server import serve as run_server

    cfg = ServeConfig.from_env(host=host, port=port, max_batch=max_batch)
    cfg.check_bind()
    ws = _ws()
    err.print(f"serving {ws.settings.home} on http://{host}:{port}/v1 (admin endpoints "
              f"{'enabled' if cfg.admin_token else 'disabled: no STEMMA_ADMIN_TOKEN'})")
    run_server(ws, cfg)


@app.command()
def profile(out_file: Path = typer.Option(None, "--out", help="Write the profile (JSON) here.")) -> None:
    """Measure this machine (memory, cores, GEMM peak) as a device profile for `select` and `pull`."""
    import psutil

    from .footprint import machine_profile

    doc = {"memory_bytes": psutil.virtual_memory().available, "latency_ms": None, "min_quality": None,
           "language": None, "domain": None, "machine": machine_profile()}
    text = json.dumps(doc, indent=2)
    if out_file:
        try:
            out_file.write_text(text + "\n")
        except OSError as e:
            raise StemmaError(f"cannot write {out_file}: {e.strerror}") from None
        out.print(f"profile of this machine written to {out_file}")
    out.print_json(text)


def _selection(ws, language, domain, memory, latency, min_quality, profile_file):
    from .select import Profile, parse_bytes, parse_ms, select_profile

    prof = Profile.load(profile_file) if profile_file else Profile()
    return select_profile(ws, prof, language=language, domain=domain,
                          memory_bytes=parse_bytes(memory) if memory else None,
                          latency_ms=parse_ms(latency) if latency else None, min_quality=min_quality)


@app.command("select")
def select_cmd(
    language: str = typer.Option(None, "--language", help="Language node, e.g. en."),
    domain: str = typer.Option(None, "--domain", help="Domain below it, e.g. software/python."),
    memory: str = typer.Option(None, "--memory", help="Peak resident memory budget, e.g. 300MB."),
    latency: str = typer.Option(None, "--latency", help="Time per token budget, e.g. 25ms."),
    min_quality: float = typer.Option(None, "--min-quality", help="Highest acceptable perplexity on the domain."),
    profile_file: Path = typer.Option(None, "--profile", help="Device profile (JSON, see `stemma profile`)."),
) -> None:
    """Rank the node, its ancestors and their variants under a device's constraints, and say why."""
    sel = _selection(_ws(), language, domain, memory, latency, min_quality, profile_file)
    t = Table("", "node", "version", "relation", "perplexity", "peak memory", "ms/token", "why",
              title=f"candidates for {sel.target} (perplexity on its test split)")
    for c in sel.ranked:
        mark = "[green]*[/green]" if c is sel.choice else ("" if c.fits else "[red]x[/red]")
        t.add_row(mark, c.node, c.version.short, c.version.row.relation, f"{c.perplexity:.2f}",
                  _human_bytes(c.memory), f"{c.ms_per_token:.1f}", c.reason)
    out.print(t)
    if sel.choice is None:
        raise StemmaError(sel.nothing_fits())
    out.print(f"choice: {sel.choice.node}@{sel.choice.version.short}: {sel.choice.reason}", highlight=False)


@app.command()
def pull(
    ref: str = typer.Argument(..., help="node, node@version, or auto (the selector's choice for --profile)"),
    out_dir: Path = typer.Option(..., "--out", help="Directory to create."),
    fmt: str = typer.Option("hf", "--format", help="hf, safetensors (compressed as stored) or gguf."),
    profile_file: Path = typer.Option(None, "--profile", help="Device profile for auto (JSON)."),
    language: str = typer.Option(None, "--language", help="For auto: language (overrides the profile)."),
    domain: str = typer.Option(None, "--domain", help="For auto: domain (overrides the profile)."),
    memory: str = typer.Option(None, "--memory", help="For auto: memory budget (overrides the profile)."),
    latency: str = typer.Option(None, "--latency", help="For auto: latency budget (overrides the profile)."),
    gguf_type: str = typer.Option("auto", "--gguf-type", help="auto (f16 for quantised variants, else f32), "
                                  "f32, f16, q8_0 (llama.cpp's quantizer)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Materialise a version (or the best fit for a device) as a HF, safetensors or GGUF directory + model card."""
    from .pull import pull as run_pull

    ws = _ws()
    why = None
    if ref == "auto":
        sel = _selection(ws, language, domain, memory, latency, None, profile_file)
        choice = sel.require()
        v, why = choice.version, f"{choice.node}: {choice.reason}"
        out.print(f"auto: {why}", highlight=False)
    else:
        v = ws.resolve_version(ref)
    path = run_pull(ws, v, out_dir, fmt=fmt, gguf_type=gguf_type, force=force, why=why)
    out.print(f"pulled {v.row.node_path}@{v.short} ({fmt}) to {path}")


@app.command()
def tradeoff(
    node: str = typer.Argument(..., help="A node with variants."),
    out_file: Path = typer.Option(Path("tradeoff.png"), "--out", help="PNG to write."),
) -> None:
    """Plot size against perplexity (and tokens/s) for a node and its variants, Pareto front marked."""
    from .tradeoff import plot, tradeoff_points

    pts = tradeoff_points(_ws(), node)
    t = Table("variant", "size", "perplexity", "tokens/s", "Pareto (size, ppl)", "Pareto (+ speed)",
              title=f"{node}: size vs perplexity vs speed")
    for p in sorted(pts, key=lambda p: p.bytes):
        t.add_row(p.label, _human_bytes(p.bytes), f"{p.perplexity:.2f}",
                  "-" if p.tokens_per_s is None else f"{p.tokens_per_s:.0f}", "yes" if p.front else "",
                  "yes" if p.front_speed else "")
    out.print(t)
    out.print(f"plot written to {plot(pts, node, out_file)}")


def _add_update_commands() -> None:
    from .update.cli import update_app

    app.add_typer(update_app, name="update")


_add_update_commands()


def main() -> None:
    try:
        app()
    except StemmaError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
