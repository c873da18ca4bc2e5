"""Evaluation suites: declared in stemma.yaml, recorded per node in the registry, compared along the tree.

```yaml
suites:
  software:
    - {task: manpage-name, kind: generation, config: {path: tasks/manpage-name.jsonl, stop: ["\\n\\n"]}}
    - {task: manpage-name-noise, kind: robustness, config: {task: manpage-name}}
eval: [safety]                      # the tree-wide default suites of a node
nodes:
  en/software: {method: lora, dataset: en-software, eval: [software], release_gate: {...}}
```

A node's ``eval`` replaces the default (``eval: []``: none). Everything is checked at spec time (kinds, configs,
task files and their rows, robustness targets, release gates, each task's generation length against the node's
context). `stemma build` records each node's tasks (their definitions as blobs) and release gate in its registry
row, so `stemma eval`, `stemma check` and `stemma tree` work from the registry alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from .tasks import TaskSpec, make_task_spec

_ENTRY_KEYS = {"task", "kind", "config"}


def parse_suites(raw: dict[str, Any], root_dir: Path, source: str) -> dict[str, tuple[TaskSpec, ...]]:
    """Suite name -> its tasks, validated. A task id means one task: declared twice, it must be declared alike."""
    entries: list[tuple[str, int, dict]] = []
    for name, items in (raw or {}).items():
        where = f"{source}: suite {name}"
        if not isinstance(name, str) or not name:
            raise SpecError(f"{source}: suite names must be non-empty strings")
        if not isinstance(items, list) or not items:
            raise SpecError(f"{where}: a suite is a non-empty list of {{task, kind, config}} entries")
        for i, e in enumerate(items):
            if not isinstance(e, dict):
                raise SpecError(f"{where}: entry {i + 1}: expected a mapping with task, kind and config")
            unknown = sorted(set(e) - _ENTRY_KEYS)
            if unknown:
                raise SpecError(f"{where}: entry {i + 1}: unknown key(s) {', '.join(map(str, unknown))} "
                                f"(known: config, kind, task)")
            for k in ("task", "kind"):
                if not e.get(k):
                    raise SpecError(f"{where}: entry {i + 1}: missing {k}")
            entries.append((name, i, e))
    specs: dict[str, TaskSpec] = {}
    raw_of: dict[str, tuple[str, dict]] = {}

    def make(name: str, e: dict) -> None:
        tid = e["task"]
        where = f"{source}: suite {name} task {tid}"
        if tid in raw_of:
            if (raw_of[tid][1].get("kind"), raw_of[tid][1].get("config")) != (e.get("kind"), e.get("config")):
                raise SpecError(f"{where}: declared differently in suite {raw_of[tid][0]}; a task id names one task")
            return
        inner = None
        if e["kind"] == "robustness":
            target = (e.get("config") or {}).get("task")
            if isinstance(target, str) and target:
                if target not in specs:
                    raise SpecError(f"{where}: robustness of unknown task {target!r} (declare it in a suite)")
                inner = specs[target]
                if inner.cls.prompt_field is None:
                    raise SpecError(f"{where}: tasks of kind {inner.kind} have no prompts to perturb")
        spec = make_task_spec(tid, e["kind"], e.get("config"), root_dir, where, inner=inner)
        if inner is not None:
            metric = spec.config.metric
            if metric and metric not in inner.metrics:
                raise SpecError(f"{where}: unknown metric {metric!r} of task {inner.id} "
                                f"(kind {inner.kind} reports {', '.join(inner.metrics)})")
        specs[tid] = spec
        raw_of[tid] = (name, e)

    for name, _, e in entries:  # tasks first, then the robustness tasks that perturb them
        if e["kind"] != "robustness":
            make(name, e)
    for name, _, e in entries:
        if e["kind"] == "robustness":
            make(name, e)
    return {name: tuple(specs[e["task"]] for n, _, e in entries if n == name) for name in (raw or {})}


def resolve_eval(names: list[str] | None, default: list[str] | None, suites: dict, where: str) -> tuple[str, ...]:
    """The suites a node is evaluated on: its own ``eval``, else the tree's default."""
    chosen = default if names is None else names
    for s in chosen or ():
        if s not in suites:
            known = ", ".join(sorted(suites)) or "none declared"
            raise SpecError(f"{where}: unknown suite {s!r} in eval (suites: {known})")
    return tuple(dict.fromkeys(chosen or ()))


def tasks_of(suites: dict[str, tuple[TaskSpec, ...]], names: tuple[str, ...]) -> list[tuple[tuple[str, ...], TaskSpec]]:
    """(the suites it is in, task) for every task of the named suites, each task once, in order."""
    out: dict[str, tuple[list[str], TaskSpec]] = {}
    for s in names:
        for t in suites[s]:
            out.setdefault(t.id, ([], t))[0].append(s)
    return [(tuple(ss), t) for ss, t in out.values()]


def node_context(nodes: dict, path: str) -> int | None:
    """The context a node's models have, where the spec says it (a pretrained root's config); None if unknown."""
    cur = path
    while nodes[cur].parent is not None:
        cur = nodes[cur].parent
    ctx = getattr(nodes[cur].config, "context", None)
    return int(ctx) if isinstance(ctx, int) else None


def attach(tree, nodes: dict, root_dir: Path, source: str) -> tuple[dict[str, tuple[TaskSpec, ...]], dict]:
    """Parse ``suites``, each node's ``eval`` and ``release_gate`` (``tree`` is the parsed YAML); returns the suites
    and the nodes with their ``eval`` and ``release_gate`` set."""
    from .gate import make_release_gate

    suites = parse_suites(tree.suites, root_dir, source)
    default = resolve_eval(tree.eval, None, suites, f"{source}: eval")
    out = {}
    for path, n in nodes.items():
        raw = tree.nodes[path]
        where = f"{source}: node {path}"
        names = resolve_eval(raw.eval, list(default), suites, where)
        tasks = [t for _, t in tasks_of(suites, names)]
        ctx = node_context(nodes, path)
        for t in tasks:
            new = t.task().max_new_tokens
            if ctx is not None and new >= ctx:
                raise SpecError(f"{where}: task {t.id} generates {new} tokens but the node's context is {ctx}")
        parent_tasks = []
        if n.parent is not None:
            pr = tree.nodes[n.parent]
            parent_tasks = [t for _, t in tasks_of(suites, resolve_eval(pr.eval, list(default), suites, where))]
        gate = make_release_gate(raw.release_gate, where, tasks, parent_tasks,
                                 parent_dataset=n.parent is not None and nodes[n.parent].dataset is not None)
        out[path] = dataclasses.replace(n, eval=names, release_gate=gate)
    return suites, out


# ---------------------------------------------------------------------------------------------- the registry
_DEFINITIONS: dict[str, TaskSpec] = {}


def record(ws, path: str, suites: dict[str, tuple[TaskSpec, ...]], names: tuple[str, ...], gate) -> None:
    """Store the node's task definitions as blobs and record them and its release gate in the node's row."""
    from ..registry.tables import Node

    entries = []
    for in_suites, t in tasks_of(suites, names):
        parts = ([t.inner] if t.inner else []) + [t]
        for part in parts:
            ws.store.put_json(part.definition)
        entries.append({"id": t.id, "kind": t.kind, "suites": list(in_suites), "definition": t.digest,
                        "blobs": [p.digest for p in parts]})
    gate_doc = dataclasses.asdict(gate) if gate is not None else None
    with ws.db.session() as s:
        n = s.get(Node, path)
        if n is not None and (n.tasks != entries or n.release_gate != gate_doc):
            n.tasks, n.release_gate = entries, gate_doc


def load_definition(ws, digest: str) -> TaskSpec:
    if digest not in _DEFINITIONS:
        _DEFINITIONS[digest] = TaskSpec.from_definition(ws.store.get_json(digest))
    return _DEFINITIONS[digest]


def recorded_tasks(ws, path: str, suite: str | None = None) -> list[TaskSpec]:
    """The tasks recorded for a node (optionally those of one suite)."""
    n = ws.node(path)
    if n is None:
        return []
    return [load_definition(ws, e["definition"]) for e in (n.tasks or []) if suite is None or suite in e["suites"]]


def recorded_suites(ws, path: str) -> list[str]:
    n = ws.node(path)
    return sorted({s for e in ((n.tasks if n else None) or []) for s in e["suites"]})


# ---------------------------------------------------------------------------------------------- the tree's view
@dataclass
class TaskCell:
    """One task's score on a node and on its parent."""

    task: str
    value: float | None
    parent_value: float | None
    higher_is_better: bool

    @property
    def change(self) -> float | None:
        """Score minus the parent's (for a parent's task: how much the child forgot, in the metric's units)."""
        if self.value is None or self.parent_value is None:
            return None
        return self.value - self.parent_value

    @property
    def better(self) -> bool | None:
        c = self.change
        return None if c is None or c == 0 else (c > 0) == self.higher_is_better


@dataclass
class TaskRow:
    path: str
    depth: int
    version: str | None
    own: list[TaskCell]
    """The node's own tasks: its score, the parent's (gain)."""
    parents: list[TaskCell]
    """The parent's own tasks: the node's score, the parent's (forgetting)."""


def known_metric(metric: str) -> bool:
    from .tasks import all_metrics

    return metric in all_metrics()


def task_rows(ws, metric: str) -> list[TaskRow]:
    """Every node of the tree with stored scores of ``metric`` on its own and its parent's tasks (nothing is run)."""
    from ..lineage import tree_rows
    from .tasks import all_metrics

    higher = all_metrics()[metric]

    def value(vid: str | None, t: TaskSpec) -> float | None:
        return None if vid is None else ws.get_metric(vid, t.metric_name(metric), None, t.key)

    rows = []
    for r in tree_rows(ws):
        vid = r.version.id if r.version else None
        parent_id = ws.tree_parent_id(vid) if vid else None
        node = ws.node(r.path)
        own = [t for t in recorded_tasks(ws, r.path) if metric in t.metrics]
        ptasks = [t for t in recorded_tasks(ws, node.parent_path) if metric in t.metrics] \
            if node and node.parent_path else []
        rows.append(TaskRow(
            path=r.path, depth=r.depth, version=r.version.short if r.version else None,
            own=[TaskCell(t.id, value(vid, t), value(parent_id, t), higher) for t in own],
            parents=[TaskCell(t.id, value(vid, t), value(parent_id, t), higher) for t in ptasks]))
    return rows


def task_summary(ws, version_id: str) -> dict[str, dict[str, float]]:
    """``{task id: {metric: value}}`` of every task score stored for a version (newest definition wins)."""
    out: dict[str, dict[str, float]] = {}
    for m in ws.metrics_of(version_id):
        if m.name.startswith("task:") and "/" in m.name:
            tid, metric = m.name[5:].rsplit("/", 1)
            out.setdefault(tid, {})[metric] = round(m.value, 4)
    return out
