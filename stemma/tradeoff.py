"""`stemma tradeoff`: size against perplexity (and tokens/s) for a node and its variants, Pareto front marked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import StemmaError
from .footprint import disk_bytes, stored
from .workspace import Workspace


@dataclass
class Point:
    node: str
    label: str
    bytes: int
    perplexity: float
    tokens_per_s: float | None
    front: bool = False
    """On the size/perplexity front."""
    front_speed: bool = False
    """On the size/perplexity/speed front (a bigger or worse variant can still be the fastest)."""


def _costs(p: Point, speed: bool) -> tuple[float, ...]:
    # Smaller is better on every axis; an unmeasured speed counts as the slowest.
    base = (float(p.bytes), p.perplexity)
    return base + (-(p.tokens_per_s or 0.0),) if speed else base


def _dominated(p: Point, points: list[Point], speed: bool) -> bool:
    mine = _costs(p, speed)
    for q in points:
        theirs = _costs(q, speed)
        if q is not p and all(a <= b for a, b in zip(theirs, mine)) and theirs != mine:
            return True
    return False


def pareto(points: list[Point]) -> list[Point]:
    """Mark the points no other point beats on both size and perplexity (smaller is better on both), and
    the wider front that also counts decode speed; returns the size/perplexity front."""
    for p in points:
        p.front = not _dominated(p, points, speed=False)
        p.front_speed = not _dominated(p, points, speed=True)
    return [p for p in points if p.front]


def tradeoff_points(ws: Workspace, node: str, measure: bool = True) -> list[Point]:
    """The node (merged, fp32) and each variant, on the node's own test split.

    ``measure=False`` reads stored perplexities only and leaves out the versions without one (the dashboard
    never evaluates inside a request)."""
    from .evaluate.evaluator import Evaluator
    from .progress import NullReporter
    from .select import candidates_for

    cands = [(n, v) for n, v, kind in candidates_for(ws, node) if kind in ("target", "variant")
             and (kind == "target" or ws.node(n).parent_path == node)]
    ds = ws.version_datasets(cands[0][1].id).get("train")
    if ds is None:
        raise StemmaError(f"{node} has no dataset of its own to measure perplexity on")
    ev = Evaluator(ws, NullReporter())
    pts = []
    for n, v in cands:
        ppl = ev.ppl(v, ds) if measure else ev.stored(v, ds)
        if ppl is None:
            continue
        fp = stored(ws, v.id)
        pts.append(Point(node=n, label=n[len(node) + 1:] or f"{node.rsplit('/', 1)[-1]} (fp32)",
                         bytes=fp.disk_bytes if fp else disk_bytes(ws, v.id), perplexity=ppl,
                         tokens_per_s=fp.tokens_per_s if fp else None))
    pareto(pts)
    return pts


def plot(points: list[Point], node: str, out: Path) -> Path:
    """Write a PNG: size vs perplexity (front joined), and tokens/s vs perplexity when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [p for p in points if p.tokens_per_s]
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(12 if speed else 7, 5), squeeze=False)
    ax = axes[0][0]
    for p in points:
        ax.scatter(p.bytes / 2**20, p.perplexity, s=70, marker="o" if p.front else "x",
                   color="tab:red" if p.front else "tab:gray", zorder=3)
        ax.annotate(p.label, (p.bytes / 2**20, p.perplexity), textcoords="offset points", xytext=(6, 4), fontsize=9)
    front = sorted((p for p in points if p.front), key=lambda p: p.bytes)
    ax.step([p.bytes / 2**20 for p in front], [p.perplexity for p in front], where="post", color="tab:red",
            alpha=0.6, label="Pareto front (size, perplexity)")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity on the node's test split (lower is better)")
    ax.set_title(f"{node}: size vs perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    if speed:
        ax2 = axes[0][1]
        for p in speed:
            ax2.scatter(p.tokens_per_s, p.perplexity, s=70, color="tab:red" if p.front_speed else "tab:gray",
                        marker="o" if p.front_speed else "x", zorder=3)
            ax2.annotate(p.label, (p.tokens_per_s, p.perplexity), textcoords="offset points", xytext=(6, 4),
                         fontsize=9)
        ax2.set_xlabel("decode tokens/s, single stream (measured)")
        ax2.set_ylabel("perplexity")
        ax2.set_title("speed vs perplexity (red: on the size/perplexity/speed front)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise StemmaError(f"cannot write {out}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return out
