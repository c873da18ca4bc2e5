"""stemma.yaml -> validated, plain objects.

Pydantic checks the YAML at the edge; inside, the tree is frozen dataclasses. Everything that can be
checked without touching the registry is checked here, before any build work starts: node names, parents,
cycles, layers, methods and their configs, dataset sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .configs import make_gate, make_rebase
from .data.options import IngestOptions
from .errors import SpecError

LAYERS = ("master", "language", "domain", "subdomain", "device")
_SEGMENT = r"[a-z0-9][a-z0-9_.-]{0,63}"
NODE_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT}){{0,7}}$")


def validate_node_path(path: str) -> str:
    if not isinstance(path, str) or not NODE_RE.match(path) or ".." in path:
        raise SpecError(f"invalid node name {path!r}: use lowercase segments of letters, digits, '_', '-' or '.', "
                        "separated by '/' (e.g. en/software/python)")
    return path


class _DatasetYaml(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1)
    license: str | None = None
    language: str | None = None
    domain: str | None = None
    description: str | None = None
    test_fraction: float = IngestOptions.test_fraction  # the defaults are the ingest options' own
    max_doc_chars: int = IngestOptions.max_doc_chars
    curate: list[Any] | None = None


class _NodeYaml(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    parent: str | None = None
    layer: str | None = None
    dataset: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    gate: dict[str, Any] | None = None
    on_parent_update: str = "retrain"
    rebase: dict[str, Any] = Field(default_factory=dict)
    eval: list[str] | None = None
    release_gate: dict[str, Any] | None = None


class _TreeYaml(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    datasets: dict[str, _DatasetYaml] = Field(default_factory=dict)
    nodes: dict[str, _NodeYaml]
    suites: dict[str, Any] = Field(default_factory=dict)
    eval: list[str] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    paths: tuple[Path, ...]
    options: IngestOptions
    """Everything else that decides the dataset: licence, language, domain, split, curation steps."""


@dataclass(frozen=True)
class NodeSpec:
    path: str
    method: str
    parent: str | None
    layer: str
    dataset: str | None
    """A dataset declared in this file, or a registered dataset name (``name``, ``name@seq``)."""
    config: Any
    """The method's config dataclass, validated."""
    raw_config: dict[str, Any] = field(default_factory=dict, compare=False)
    gate: Any = None
    """`stemma.configs.GateConfig`: when this node accepts its contributors' updates."""
    on_parent_update: str = "retrain"
    """``retrain`` (build anew from the recipe) or ``rebase`` (a LoRA child re-fits its adapter onto the new parent,
    distilling from its previous version)."""
    rebase: Any = None
    """`stemma.configs.RebaseConfig` when ``on_parent_update`` is ``rebase``."""
    eval: tuple[str, ...] = ()
    """Suites the node is evaluated on (its own ``eval``, else the tree's default; `stemma.evaluate.suites`)."""
    release_gate: Any = None
    """`stemma.evaluate.gate.ReleaseGate`: what its version must meet to be released (`stemma check`)."""


@dataclass(frozen=True)
class TreeSpec:
    name: str
    root_dir: Path
    datasets: dict[str, DatasetSpec]
    nodes: dict[str, NodeSpec]
    order: tuple[str, ...]
    """Parents before children (a topological order)."""
    suites: dict[str, tuple] = field(default_factory=dict)
    """Suite name -> its `stemma.evaluate.tasks.TaskSpec`s, task files read and checked."""

    def descendants(self, path: str) -> list[str]:
        out, frontier = [], [path]
        while frontier:
            cur = frontier.pop()
            kids = [n for n in self.order if self.nodes[n].parent == cur]
            out.extend(kids)
            frontier.extend(kids)
        return out


def _default_parent(path: str, method_is_root: bool) -> str | None:
    if "/" in path:
        return path.rsplit("/", 1)[0]
    return None if method_is_root else "master"


def _infer_layer(path: str, parent: str | None) -> str:
    if parent is None:
        return "master"
    depth = path.count("/") + 1
    return LAYERS[min(depth, len(LAYERS) - 1)]


def _toposort(nodes: dict[str, NodeSpec]) -> tuple[str, ...]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = stack[stack.index(n):] + [n]
            raise SpecError(f"cycle in the tree: {' -> '.join(cycle)}")
        state[n] = 1
        p = nodes[n].parent
        if p is not None:
            visit(p, stack + [n])
        state[n] = 2
        order.append(n)

    for n in sorted(nodes):
        visit(n, [])
    return tuple(order)


def parse_spec(data: Any, root_dir: Path, source: str = "stemma.yaml") -> TreeSpec:
    from .methods import get

    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with 'nodes' at the top level")
    try:
        tree = _TreeYaml.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SpecError(f"{source}: {loc}: {err['msg']}") from None
    if not tree.nodes:
        raise SpecError(f"{source}: no nodes declared")

    datasets: dict[str, DatasetSpec] = {}
    for name, d in tree.datasets.items():
        from .data.ingest import validate_dataset_name

        validate_dataset_name(name)
        paths = tuple((root_dir / p).resolve() if not Path(p).is_absolute() else Path(p) for p in d.paths)
        for p in paths:
            if not p.exists():
                raise SpecError(f"{source}: dataset {name}: {p}: no such file or directory")
        if not 0 < d.test_fraction < 0.5:
            raise SpecError(f"{source}: dataset {name}: test_fraction must be in (0, 0.5)")
        from .data.curate import parse_steps

        curate = parse_steps(d.curate, f"{source}: dataset {name}") if d.curate is not None else ()
        options = IngestOptions(name=name, license=d.license, language=d.language, domain=d.domain,
                                description=d.description, test_fraction=d.test_fraction,
                                max_doc_chars=d.max_doc_chars, steps=curate)
        datasets[name] = DatasetSpec(name=name, paths=paths, options=options)

    nodes: dict[str, NodeSpec] = {}
    for path, n in tree.nodes.items():
        validate_node_path(path)
        method = get(n.method)
        parent = n.parent if n.parent is not None else _default_parent(path, method.root)
        if method.root and n.parent is not None:
            raise SpecError(f"{source}: node {path}: method {n.method} starts a tree and takes no parent")
        if not method.root and parent is None:
            raise SpecError(f"{source}: node {path}: method {n.method} needs a parent")
        if parent is not None:
            validate_node_path(parent)
            if parent == path:
                raise SpecError(f"cycle in the tree: {path} -> {path}")
            if parent not in tree.nodes:
                raise SpecError(f"{source}: node {path}: unknown parent {parent!r}")
        layer = n.layer or _infer_layer(path, parent)
        if layer not in LAYERS:
            raise SpecError(f"{source}: node {path}: unknown layer {layer!r} (one of {', '.join(LAYERS)})")
        if method.needs_dataset and not n.dataset:
            raise SpecError(f"{source}: node {path}: method {n.method} needs a dataset")
        cfg = method.make_config(n.config, where=f"{source}: node {path}")
        gate = make_gate(n.gate, f"{source}: node {path}")
        if n.on_parent_update not in ("retrain", "rebase"):
            raise SpecError(f"{source}: node {path}: on_parent_update must be retrain or rebase")
        if n.on_parent_update == "rebase" and not method.can_rebase(cfg):
            raise SpecError(f"{source}: node {path}: only adapter children can rebase (method {n.method} retrains)")
        if n.rebase and n.on_parent_update != "rebase":
            raise SpecError(f"{source}: node {path}: rebase settings given but on_parent_update is not rebase")
        rebase = make_rebase(n.rebase, f"{source}: node {path}") if n.on_parent_update == "rebase" else None
        nodes[path] = NodeSpec(path=path, method=n.method, parent=parent, layer=layer, dataset=n.dataset,
                               config=cfg, raw_config=dict(n.config), gate=gate,
                               on_parent_update=n.on_parent_update, rebase=rebase)
    order = _toposort(nodes)
    from .evaluate.suites import attach

    suites, nodes = attach(tree, nodes, root_dir, source)
    return TreeSpec(name=tree.name or root_dir.name, root_dir=root_dir, datasets=datasets, nodes=nodes, order=order,
                    suites=suites)


def load_spec(path: str | Path) -> TreeSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return parse_spec(data, p.resolve().parent, source=str(p))
