"""Shared helpers for benchmarks: argument parsing, the result table, JSON output, a text sample."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "demo" / "corpus"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="the same comparison, small enough for about a minute")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    return p


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


def print_table(title: str, rows: list[tuple[str, str, str, str]],
                columns: tuple[str, str] = ("peer", "stemma")) -> None:
    """rows: (metric, peer, stemma, ratio); ``columns`` names the two compared sides."""
    from rich.console import Console
    from rich.table import Table

    t = Table("metric", *columns, "ratio", title=title)
    for r in rows:
        t.add_row(*r)
    Console(width=140).print(t)


def write_json(path: Path | None, figures: dict) -> None:
    if path:
        path.write_text(json.dumps({**figures, "machine": machine()}, indent=2))


def sample_texts(max_bytes: int = 1_500_000) -> list[str]:
    texts, total = [], 0
    for name in ("en-manpages.jsonl", "en-python.jsonl", "de-manpages.jsonl"):
        with open(CORPUS / name) as f:
            for line in f:
                t = json.loads(line)["text"]
                texts.append(t)
                total += len(t)
                if total > max_bytes:
                    return texts
    return texts
