"""Geometry of the dashboard's two drawings, computed on the server; the templates write it out as SVG.

The tree runs left to right (master -> language -> domain -> sub-domain -> device): one column per depth, one
row per leaf, each parent centred on its children. The trade-off plot is `stemma tradeoff`'s, in SVG: size vs
perplexity with the Pareto front joined, and decode speed vs perplexity where speeds are measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

BOX_W, BOX_H = 210, 88
"""A node's box in the tree drawing (SVG units = CSS pixels at full size)."""
COL, ROW, PAD = 250, 104, 8


@dataclass
class Box:
    node: Any
    """The `stemma.ui.data.TreeNode` drawn."""
    x: float
    y: float
    edge: str | None = None
    """The SVG path from the parent's box to this one (None at a root)."""


def layout(nodes: list) -> tuple[list[Box], int, int]:
    """Boxes for depth-first tree nodes (each with ``row.depth`` and ``parent``) and the drawing's size."""
    children: dict[str | None, list] = {}
    for n in nodes:
        children.setdefault(n.parent, []).append(n)
    ys: dict[str, float] = {}
    leaf = 0

    def place(n) -> float:
        nonlocal leaf
        kids = children.get(n.path, [])
        if kids:
            got = [place(k) for k in kids]
            ys[n.path] = (got[0] + got[-1]) / 2
        else:
            ys[n.path] = PAD + leaf * ROW
            leaf += 1
        return ys[n.path]

    for root in children.get(None, []):
        place(root)
    boxes, at = [], {}
    for n in nodes:
        b = Box(node=n, x=PAD + n.row.depth * COL, y=ys[n.path])
        parent = at.get(n.parent)
        if parent is not None:
            x0, y0 = parent.x + BOX_W, parent.y + BOX_H / 2
            x1, y1 = b.x, b.y + BOX_H / 2
            mid = (x0 + x1) / 2
            b.edge = f"M{x0:.0f},{y0:.0f} C{mid:.0f},{y0:.0f} {mid:.0f},{y1:.0f} {x1:.0f},{y1:.0f}"
        at[n.path] = b
        boxes.append(b)
    depth = max((n.row.depth for n in nodes), default=0)
    return boxes, PAD * 2 + depth * COL + BOX_W, PAD * 2 + max(leaf - 1, 0) * ROW + BOX_H


# ------------------------------------------------------------------------------------------------ trade-off
PLOT_W, PLOT_H = 520, 320
LEFT, RIGHT, TOP, BOTTOM = 62, 16, 30, 46


@dataclass
class Dot:
    x: float
    y: float
    label: str
    front: bool
    title: str
    """The point's numbers, shown on hover."""

    @property
    def left(self) -> bool:
        """Whether its label goes to the left of it (near the right edge, where it would be cut)."""
        return self.x > PLOT_W * 0.75


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    dots: list[Dot]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    front: str | None = None
    """The Pareto front as an SVG step path (size vs perplexity only)."""


@dataclass
class Plot:
    panels: list[Panel] = field(default_factory=list)
    width: int = PLOT_W
    height: int = PLOT_H


def _scale(values: list[float], lo_px: float, hi_px: float):
    """A linear map of ``values``' range (padded 8%) onto pixels, and its ticks."""
    lo, hi = min(values), max(values)
    span = hi - lo or abs(hi) * 0.2 or 1.0
    lo, hi = lo - span * 0.08, hi + span * 0.08

    def px(v: float) -> float:
        return lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px)

    step = (hi - lo) / 4
    digits = max(0, math.ceil(-math.log10(step)) + 1)  # enough to tell neighbouring ticks apart
    return px, [(px(lo + step * i), f"{lo + step * i:.{digits}f}") for i in range(5)]


def _panel(points: list, x_of, title: str, x_label: str, front_of) -> Panel:
    xs = [x_of(p) for p in points]
    ys = [p.perplexity for p in points]
    sx, x_ticks = _scale(xs, LEFT, PLOT_W - RIGHT)
    sy, y_ticks = _scale(ys, PLOT_H - BOTTOM, TOP)
    dots = [Dot(sx(x_of(p)), sy(p.perplexity), p.label, front_of(p),
                f"{p.label}: {p.bytes / 2**20:.2f} MiB, perplexity {p.perplexity:.3f}"
                + (f", {p.tokens_per_s:.0f} tokens/s" if p.tokens_per_s else "")) for p in points]
    return Panel(title, x_label, "perplexity on the node's test split", dots, x_ticks, y_ticks)


def tradeoff_plot(points: list) -> Plot:
    """`stemma.tradeoff.Point`s (Pareto fronts marked) as one or two SVG panels."""
    mib = lambda p: p.bytes / 2**20  # noqa: E731
    size = _panel(points, mib, "size vs perplexity", "size on disk (MiB)", lambda p: p.front)
    front = sorted((d for d, p in zip(size.dots, points) if p.front), key=lambda d: d.x)
    if front:
        steps = [f"M{front[0].x:.1f},{front[0].y:.1f}"]
        for d in front[1:]:
            steps.append(f"H{d.x:.1f} V{d.y:.1f}")
        size.front = " ".join(steps)
    plot = Plot([size])
    timed = [p for p in points if p.tokens_per_s]
    if timed:
        plot.panels.append(_panel(timed, lambda p: p.tokens_per_s, "speed vs perplexity",
                                  "decode tokens/s, single stream (measured)", lambda p: p.front_speed))
    return plot
