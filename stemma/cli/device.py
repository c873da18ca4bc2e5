"""Device verbs: profile this machine, select a version for a device, pull it, plot the trade-off."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import StemmaError
from .app import app
from .console import human_bytes, open_ws, out

RUNTIME_HELP = "A runtime the device has: torch (stemma) or llamacpp (GGUF); repeat for several."


@app.command()
def profile(out_file: Path = typer.Option(None, "--out", help="Write the profile (JSON) here."),
            runtime: list[str] = typer.Option(None, "--runtime", help=RUNTIME_HELP + " Default: torch, and "
                                              "llamacpp where llama-cpp-python imports.")) -> None:
    """Measure this machine (memory, cores, GEMM peak) as a device profile for `select` and `pull`."""
    import psutil

    from ..footprint import llamacpp_available, machine_profile
    from ..select import check_runtimes

    runtimes = check_runtimes(runtime) if runtime else ["torch"] + (["llamacpp"] if llamacpp_available() else [])
    doc = {"memory_bytes": psutil.virtual_memory().available, "latency_ms": None, "min_quality": None,
           "language": None, "domain": None, "runtimes": runtimes, "machine": machine_profile()}
    text = json.dumps(doc, indent=2)
    if out_file:
        try:
            out_file.write_text(text + "\n")
        except OSError as e:
            raise StemmaError(f"cannot write {out_file}: {e.strerror}") from None
        out.print(f"profile of this machine written to {out_file}")
    out.print_json(text)


def _selection(ws, language, domain, memory, latency, min_quality, profile_file, runtime=None, gguf_types=None):
    from ..select import Profile, check_runtimes, parse_bytes, parse_ms, select_profile

    prof = Profile.load(profile_file) if profile_file else Profile()
    return select_profile(ws, prof, language=language, domain=domain,
                          memory_bytes=parse_bytes(memory) if memory else None,
                          latency_ms=parse_ms(latency) if latency else None, min_quality=min_quality,
                          runtimes=check_runtimes(runtime) if runtime else None, gguf_types=gguf_types)


@app.command("select")
def select_cmd(
    language: str = typer.Option(None, "--language", help="Language node, e.g. en."),
    domain: str = typer.Option(None, "--domain", help="Domain below it, e.g. software/python."),
    memory: str = typer.Option(None, "--memory", help="Peak resident memory budget, e.g. 300MB."),
    latency: str = typer.Option(None, "--latency", help="Time per token budget, e.g. 25ms."),
    min_quality: float = typer.Option(None, "--min-quality", help="Highest acceptable perplexity on the domain."),
    profile_file: Path = typer.Option(None, "--profile", help="Device profile (JSON, see `stemma profile`)."),
    runtime: list[str] = typer.Option(None, "--runtime", help=RUNTIME_HELP + " Default: the profile's, or all."),
) -> None:
    """Rank the node, its ancestors and their variants in each runtime under a device's constraints, and say why."""
    sel = _selection(open_ws(), language, domain, memory, latency, min_quality, profile_file, runtime)
    t = Table("", "node", "version", "relation", "runtime", "perplexity", "peak memory", "ms/token", "why",
              title=f"candidates for {sel.target} (perplexity on its test split)")
    for c in sel.ranked:
        mark = "[green]*[/green]" if c is sel.choice else ("" if c.fits else "[red]x[/red]")
        where = "torch" if c.runtime == "torch" else f"llamacpp {c.fmt}"
        t.add_row(mark, c.node, c.version.short, c.version.row.relation, where, f"{c.perplexity:.2f}",
                  human_bytes(c.memory), f"{c.ms_per_token:.1f}", c.reason)
    out.print(t)
    for s in sel.skipped:  # risk flags
        out.print(f"left out: {s}", highlight=False)
    if sel.choice is None:
        raise StemmaError(sel.nothing_fits())
    out.print(f"choice: {sel.choice.node}@{sel.choice.version.short}: {sel.choice.reason}", highlight=False)


@app.command()
def pull(
    ref: str = typer.Argument(..., help="node, node@version, or auto (the selector's choice for --profile)"),
    out_dir: Path = typer.Option(..., "--out", help="Directory to create."),
    fmt: str = typer.Option(None, "--format", help="hf, safetensors (compressed as stored) or gguf. Default: hf; "
                            "for auto, the chosen runtime's (gguf for llamacpp, hf for torch)."),
    profile_file: Path = typer.Option(None, "--profile", help="Device profile for auto (JSON)."),
    language: str = typer.Option(None, "--language", help="For auto: language (overrides the profile)."),
    domain: str = typer.Option(None, "--domain", help="For auto: domain (overrides the profile)."),
    memory: str = typer.Option(None, "--memory", help="For auto: memory budget (overrides the profile)."),
    latency: str = typer.Option(None, "--latency", help="For auto: latency budget (overrides the profile)."),
    runtime: list[str] = typer.Option(None, "--runtime", help="For auto: " + RUNTIME_HELP),
    gguf_type: str = typer.Option("auto", "--gguf-type", help="auto (f16 for quantised variants, else f32; for "
                                  "auto, the chosen one), f32, f16, q8_0 (llama.cpp's quantizer)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Materialise a version (or the best fit for a device) as a HF, safetensors or GGUF directory + model card."""
    from ..pull import pull as run_pull
    from ..select import check_runtimes

    ws = open_ws()
    why = None
    if ref == "auto":
        # An explicit format asks for the runtime that loads it (and an explicit GGUF type for that type).
        runtimes = check_runtimes(runtime) if runtime else None
        if fmt is not None:
            want = "llamacpp" if fmt == "gguf" else "torch"
            if runtimes is not None and want not in runtimes:
                raise StemmaError(f"--format {fmt} is for the {want} runtime, which --runtime leaves out")
            runtimes = [want]
        sel = _selection(ws, language, domain, memory, latency, None, profile_file, runtimes,
                         None if gguf_type == "auto" else [gguf_type])
        choice = sel.require()
        v, why = choice.version, f"{choice.node}: {choice.reason}"
        if choice.runtime == "llamacpp":
            fmt, gguf_type = "gguf", choice.fmt
        out.print(f"auto: {why}", highlight=False)
    else:
        v = ws.resolve_version(ref)
    fmt = fmt or "hf"
    path = run_pull(ws, v, out_dir, fmt=fmt, gguf_type=gguf_type, force=force, why=why)
    out.print(f"pulled {v.label} ({fmt}) to {path}")


@app.command()
def tradeoff(
    node: str = typer.Argument(..., help="A node with variants."),
    out_file: Path = typer.Option(Path("tradeoff.png"), "--out", help="PNG to write."),
) -> None:
    """Plot size against perplexity (and tokens/s) for a node and its variants, Pareto front marked."""
    from ..tradeoff import plot, tradeoff_points

    pts = tradeoff_points(open_ws(), node)
    t = Table("variant", "size", "perplexity", "tokens/s", "Pareto (size, ppl)", "Pareto (+ speed)",
              title=f"{node}: size vs perplexity vs speed")
    for p in sorted(pts, key=lambda p: p.bytes):
        t.add_row(p.label, human_bytes(p.bytes), f"{p.perplexity:.2f}",
                  "-" if p.tokens_per_s is None else f"{p.tokens_per_s:.0f}", "yes" if p.front else "",
                  "yes" if p.front_speed else "")
    out.print(t)
    out.print(f"plot written to {plot(pts, node, out_file)}")
