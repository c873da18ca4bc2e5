"""`stemma data ...`: ingest corpora, list and show datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .app import data_app
from .console import open_ws, out


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
    from ..data.ingest import IngestOptions

    ws = open_ws()
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
    for d in open_ws().list_datasets():
        t.add_row(d.name, str(d.seq), d.id[:12], d.language or "-", d.license or "-", str(d.n_docs), str(d.n_train),
                  str(d.n_test), f"{d.datasheet['counts']['whitespace_tokens']:,}")
    out.print(t)


@data_app.command("show")
def data_show(ref: str) -> None:
    """Print a dataset's datasheet (JSON)."""
    ws = open_ws()
    d = ws.resolve_dataset(ref)
    out.print_json(json.dumps({"id": d.id, "seq": d.seq, **ws.dataset_manifest(d.id)}))
