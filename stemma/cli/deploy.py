"""The deploy verbs: lay a base and its LoRA children out for another serving engine (`stemma deploy vllm`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from .app import deploy_app
from .console import err, open_ws, out


@deploy_app.command()
def vllm(
    ref: str = typer.Argument(..., help="the base: node or node@version (not an adapter)"),
    out_dir: Path = typer.Option(..., "--out", help="Directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Write a merged base, its LoRA children as PEFT directories and the `vllm serve` command (serve.sh)."""
    from ..deploy import deploy_vllm

    d = deploy_vllm(open_ws(), ref, out_dir, force=force)
    out.print(f"wrote {d.base} and {len(d.adapters)} LoRA adapter(s) to {d.out}", highlight=False)
    for node, why in d.skipped.items():
        out.print(f"  not served: {node}: {why}", highlight=False, soft_wrap=True)
    if d.warning:
        err.print(f"[yellow]note:[/yellow] {d.warning}", highlight=False, soft_wrap=True)
    out.print(shlex.join(d.command), highlight=False, soft_wrap=True, markup=False)
