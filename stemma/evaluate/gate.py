"""The release gate: thresholds a node's current version must meet before it is released.

Declared per node in stemma.yaml (``release_gate:``), validated at spec time against the node's tasks, recorded in
the node's registry row by `stemma build`, and judged by `check` (``stemma check NODE``) from the registry alone.
Scores that are not stored yet are measured (and memoised) on the way; nothing else is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError, StemmaError


@dataclass(frozen=True)
class ReleaseGate:
    """What a version must meet to be released; every field left empty is not checked."""

    max_ppl_rise: float | None = None
    """Largest relative rise of perplexity on the parent's test split against the parent itself (0.05 = 5% higher):
    how much of its parent's knowledge the node may forget."""
    min_scores: dict[str, float] = field(default_factory=dict)
    """``task/metric`` -> the lowest allowed score (for example ``manpage-name/chrf: 20``); the task must be one the
    node or its parent is evaluated on, the metric one its kind reports."""
    max_scores: dict[str, float] = field(default_factory=dict)
    """``task/metric`` -> the highest allowed score, for metrics where lower is better (perplexity, drop)."""
    max_bias_gap: float | None = None
    """Largest ``sentiment_gap`` (VADER compound, 0..2) of any of the node's bias tasks."""
    max_offensive_rate: float | None = None
    """Largest ``offensive_rate`` (0..1) of any of the node's offensive tasks."""


def make_release_gate(raw: dict[str, Any] | None, where: str, tasks: list, parent_tasks: list,
                      parent_dataset: bool) -> ReleaseGate | None:
    """The validated gate of a node, whose ``tasks`` are its own and ``parent_tasks`` its parent's;
    ``parent_dataset``: the node has a parent trained on a dataset (whose test split the perplexity rise needs)."""
    from ..configs import parse_dataclass

    if raw is None:
        return None
    gate = parse_dataclass(ReleaseGate, raw, where, "release_gate")
    if gate.max_ppl_rise is not None and not parent_dataset:
        raise SpecError(f"{where}: release_gate max_ppl_rise needs a parent trained on a dataset (its test split)")
    if gate.max_ppl_rise is not None and gate.max_ppl_rise < 0:
        raise SpecError(f"{where}: release_gate max_ppl_rise must be >= 0")
    by_id = {t.id: t for t in [*parent_tasks, *tasks]}
    for what, limits in (("min_scores", gate.min_scores), ("max_scores", gate.max_scores)):
        for name in limits:
            tid, _, metric = name.rpartition("/")
            if tid not in by_id:
                known = ", ".join(sorted(by_id)) or "none: give the node eval suites"
                raise SpecError(f"{where}: release_gate {what}: {name!r} names no task of the node or its parent "
                                f"(tasks: {known}); write task/metric")
            t = by_id[tid]
            if metric not in t.metrics:
                raise SpecError(f"{where}: release_gate {what}: unknown metric {metric!r} of task {tid} "
                                f"(kind {t.kind} reports {', '.join(t.metrics)})")
    for limit, kind in ((gate.max_bias_gap, "bias"), (gate.max_offensive_rate, "offensive")):
        if limit is not None and not any(t.kind == kind for t in tasks):
            raise SpecError(f"{where}: release_gate max_{'bias_gap' if kind == 'bias' else 'offensive_rate'} needs "
                            f"a {kind} task in the node's eval suites")
    return gate


@dataclass
class Threshold:
    """One line of a gate's verdict."""

    name: str
    value: float | None
    limit: float
    ok: bool
    reason: str


def judge(ws, node: str) -> tuple[ReleaseGate | None, list[Threshold]]:
    """Every threshold of the node's recorded gate, measured on its current version."""
    from .evaluator import Evaluator
    from .runner import score_task
    from .suites import recorded_tasks

    n = ws.node(node)
    if n is None or not n.current_version:
        raise StemmaError(f"unknown or unbuilt node {node!r}; see `stemma tree`")
    if not n.release_gate:
        return None, []
    gate = ReleaseGate(**n.release_gate)
    v = ws.version(n.current_version)
    own = recorded_tasks(ws, node)
    by_id = {t.id: t for t in [*(recorded_tasks(ws, n.parent_path) if n.parent_path else []), *own]}
    out: list[Threshold] = []

    def line(name: str, value: float | None, limit: float, upper: bool, fmt: str = "{:.4g}") -> None:
        if value is None:
            out.append(Threshold(name, None, limit, False, f"{name}: not measured"))
            return
        ok = value <= limit if upper else value >= limit
        sign = ("<=" if ok else ">") if upper else (">=" if ok else "<")
        out.append(Threshold(name, value, limit, ok,
                             f"{name} {fmt.format(value)} {sign} {'max' if upper else 'min'} {fmt.format(limit)}"))

    if gate.max_ppl_rise is not None:
        parent_id = ws.tree_parent_id(v.id)
        pds = ws.version_datasets(parent_id).get("train") if parent_id else None
        rise = None
        if pds:
            ev = Evaluator(ws)
            rise = ev.ppl(v, pds) / ev.ppl(ws.version(parent_id), pds) - 1
        line("perplexity rise on the parent's split", rise, gate.max_ppl_rise, True, "{:+.2%}")
    for limits, upper in ((gate.min_scores, False), (gate.max_scores, True)):
        for name, limit in limits.items():
            tid, _, metric = name.rpartition("/")
            t = by_id.get(tid)
            value = score_task(ws, v.id, t)[metric] if t is not None else None
            line(name, value, limit, upper)
    for limit, kind, metric in ((gate.max_bias_gap, "bias", "sentiment_gap"),
                                (gate.max_offensive_rate, "offensive", "offensive_rate")):
        if limit is None:
            continue
        scored = [(score_task(ws, v.id, t)[metric], t.id) for t in own if t.kind == kind]
        value, tid = max(scored) if scored else (None, kind)
        line(f"{tid}/{metric}", value, limit, True)
    return gate, out


def check(ws, node: str) -> tuple[bool, list[str]]:
    """Whether the node's current version passes its release gate, and one reason per failed threshold.

    A node without a gate passes with no reasons. Missing scores are measured (and stored) first.
    """
    _, lines = judge(ws, node)
    failed = [t.reason for t in lines if not t.ok]
    return not failed, failed
