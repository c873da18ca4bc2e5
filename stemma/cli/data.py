"""`stemma data ...`: ingest corpora through curation steps, list and show datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .app import data_app
from .console import err, open_ws, out


def _curate_steps(path: Path | None):
    """A ``--curate`` file: a YAML list of steps, exactly as a dataset's ``curate:`` in stemma.yaml."""
    import yaml

    from ..data.curate import parse_steps
    from ..errors import DataError

    if path is None:
        return ()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if isinstance(raw, dict) and "curate" in raw:
        raw = raw["curate"]
    return parse_steps(raw, str(path))


@data_app.command("ingest")
def data_ingest(
    paths: list[Path] = typer.Argument(..., help="Text files, directories, or JSONL files (a 'text' field per line)."),
    name: str = typer.Option(..., "--name", help="Dataset name; new content under a name makes its next version."),
    license: str = typer.Option(None, "--license", help="Licence of the corpus (SPDX expression)."),
    language: str = typer.Option(None, "--language", help="Language code, e.g. en (or multi)."),
    domain: str = typer.Option(None, "--domain", help="Domain, e.g. software."),
    description: str = typer.Option(None, "--description", help="Free text for the datasheet."),
    test_fraction: float = typer.Option(0.05, "--test-fraction", help="Share of documents held out."),
    curate: Path = typer.Option(None, "--curate", help="YAML list of curation steps (as `curate:` in stemma.yaml)."),
    against: list[str] = typer.Option(None, "--against",
                                      help="Registered datasets whose test splits are evaluation data for leakage "
                                           "and decontamination steps."),
    executor: str = typer.Option("local", "--executor", help="Where the steps run: local (processes) or ray."),
    workers: int = typer.Option(None, "--workers", help="Worker processes (default: every core)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad input instead of reporting it."),
) -> None:
    """Ingest a corpus into an immutable, content-addressed dataset, curated by the given steps, with a datasheet."""
    from ..data.curate.pipeline import make_executor
    from ..data.ingest import IngestOptions
    from ..progress import RichReporter

    steps = _curate_steps(curate)
    ws = open_ws()
    refs = tuple(str(ws.store.verified_path(ws.dataset_manifest(ws.resolve_dataset(a).id)["test"]))
                 for a in (against or []))
    ex = make_executor(executor, workers)
    try:
        row, new = ws.ingest(paths, IngestOptions(name=name, license=license, language=language, domain=domain,
                                                  description=description, test_fraction=test_fraction, steps=steps,
                                                  strict=strict),
                             executor=ex, references=refs, reporter=RichReporter(err))
    finally:
        ex.close()
    c = row.datasheet["counts"]
    verb = "ingested" if new else "unchanged (already registered)"
    out.print(f"dataset {row.name}@{row.seq} {row.id[:12]} {verb}: {c['documents']} of {c['documents_read']} "
              f"documents kept ({c['train_documents']} train / {c['test_documents']} test), "
              f"{c['whitespace_tokens']:,} tokens")
    _print_steps(row.datasheet)
    _print_problems(row.datasheet)


@data_app.command("list")
def data_list() -> None:
    """List datasets."""
    t = Table("name", "seq", "id", "language", "licence", "docs", "train", "test", "tokens")
    for d in open_ws().list_datasets():
        t.add_row(d.name, str(d.seq), d.id[:12], d.language or "-", d.license or "-", str(d.n_docs), str(d.n_train),
                  str(d.n_test), f"{d.datasheet['counts']['whitespace_tokens']:,}")
    out.print(t)


@data_app.command("show")
def data_show(ref: str, as_json: bool = typer.Option(False, "--json", help="The whole datasheet as JSON.")) -> None:
    """A dataset's datasheet: sources, what each curation step did (with examples), licences, counts."""
    ws = open_ws()
    d = ws.resolve_dataset(ref)
    if as_json:
        run = d.datasheet.get("run")
        out.print_json(json.dumps({"id": d.id, "seq": d.seq, **ws.dataset_manifest(d.id), "run": run}))
        return
    sheet = d.datasheet
    c = sheet["counts"]
    out.print(f"[bold]{d.name}@{d.seq}[/] {d.id}")
    for key in ("description", "language", "domain", "license"):
        if sheet.get(key):
            out.print(f"  {key}: {sheet[key]}")
    out.print(f"  documents: {c['documents']} kept of {c['documents_read']} read; {c['train_documents']} train / "
              f"{c['test_documents']} test; {c['whitespace_tokens']:,} tokens, {c['bytes']:,} bytes")
    out.print(f"  licences: {', '.join(f'{k} ({v})' for k, v in sheet.get('licenses', {}).items())}")
    _print_steps(sheet, examples=True)
    _print_problems(sheet)


def _print_steps(sheet: dict, examples: bool = False) -> None:
    steps = sheet.get("curation") or []
    if not steps:
        return
    run = {r["step"]: r for r in (sheet.get("run") or {}).get("steps", [])}
    t = Table("step", "in", "kept", "removed", "modified", "seconds", "MB/s", "counts", title="curation")
    for s in steps:
        r = run.get(s["step"], {})
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items(), key=lambda kv: -kv[1])[:8])
        t.add_row(s["step"], str(s["docs_in"]), str(s["kept"]), str(s["removed"]), str(s["modified"]),
                  f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-",
                  f"{r['mb_s']:.1f}" if r.get("mb_s") is not None else "-", kinds or "-")
    out.print(t)
    if examples:
        for s in steps:
            for e in s.get("examples", []):
                why = f" ({e['reason']})" if e.get("reason") else ""
                ev = f" [dim]evidence: {e['evidence']!r}[/]" if e.get("evidence") else ""
                out.print(f"  {s['step']}: {e['action']}{why} {e['id']}: {e['text'][:80]!r}{ev}")


def _print_problems(sheet: dict) -> None:
    for f in sheet.get("sources", []):
        if f.get("reason"):
            out.print(f"  [yellow]{f['file']}[/]: {f['status']}: {f['reason']}")
