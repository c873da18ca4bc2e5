"""What each dashboard page shows, read from the registry by the functions the CLI uses.

The tree is `lineage.tree_rows` with `risk.reach` (the `stemma tree` columns), the lineage is `Workspace.chain`
(`stemma lineage`), datasets are `release.facts.dataset_facts` (what a model card lists), licences are
`licenses.licensing`, footprints `footprint.stored`, the trade-off `tradeoff.tradeoff_points` on stored numbers
only, rounds `update.service.rounds`. This module only arranges them for the templates: nothing here measures,
evaluates or loads a model, so `stemma ui` answers without one in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from ..errors import StemmaError
from ..lineage import NodeRow, row_parents, tree_rows
from ..risk import Reach, reach
from ..spec import LAYERS
from ..workspace import VersionInfo, Workspace
from .graph import Box, Plot, layout, tradeoff_plot


class NotFound(StemmaError):
    """A page asks for a node or version the registry does not have (answered 404)."""


@dataclass
class TreeNode:
    """One node of the tree page: its `stemma tree` row, where it sits, and the state it is drawn in."""

    row: NodeRow
    parent: str | None
    language: str | None
    """The path of the language node above it (or itself): ``en``."""
    domain: str | None
    """Its domain below the language: ``software`` for ``en/software`` and ``en/software/python``."""
    reach: Reach | None
    shown: bool = True
    """Whether it matches the page's filters (the others are drawn dimmed and left out of the table)."""

    @property
    def path(self) -> str:
        return self.row.path

    @property
    def name(self) -> str:
        """Its own name under its parent (``python`` under ``en/software``), or its path at a root."""
        if self.parent and self.path.startswith(self.parent + "/"):
            return self.path[len(self.parent) + 1:]
        return self.path

    @property
    def state(self) -> str:
        """``flagged`` / ``affected`` (a risk flag reaches it) over its build status (ok, stale, forgetting, ...)."""
        return self.reach.mark if self.reach else self.row.status

    @property
    def flag_ids(self) -> str:
        return ", ".join(f"#{f.id}" for f in self.reach.flags) if self.reach else ""


@dataclass
class TreePage:
    nodes: list[TreeNode]
    boxes: list[Box]
    width: int
    height: int
    layers: list[str]
    languages: list[str]
    domains: list[str]
    filters: dict[str, str]

    @property
    def shown(self) -> list[TreeNode]:
        return [n for n in self.nodes if n.shown]


def _place(rows: list[NodeRow], parents: list[str | None]) -> tuple[list[str | None], list[str | None]]:
    """Each row's language node and domain (below the language), from the layers of the rows above it."""
    by_path: dict[str, tuple[str | None, str | None]] = {}
    langs, domains = [], []
    for r, parent in zip(rows, parents):
        lang, dom = by_path.get(parent, (None, None)) if parent else (None, None)
        if r.layer == "language":
            lang = r.path
        elif r.layer == "domain" and lang and r.path.startswith(lang + "/"):
            dom = r.path[len(lang) + 1:]
        by_path[r.path] = (lang, dom)
        langs.append(lang)
        domains.append(dom)
    return langs, domains


def tree_page(ws: Workspace, layer: str = "", language: str = "", domain: str = "") -> TreePage:
    """Every node with its tree row and risk state; those not matching the filters (empty: any) are dimmed."""
    rows = tree_rows(ws)
    parents = row_parents(rows)
    langs, domains = _place(rows, parents)
    flags = reach(ws)
    nodes = []
    for r, parent, lang, dom in zip(rows, parents, langs, domains):
        n = TreeNode(row=r, parent=parent, language=lang, domain=dom,
                     reach=flags.get(r.version.id) if r.version else None)
        n.shown = ((not layer or r.layer == layer) and (not language or lang == language)
                   and (not domain or dom == domain))
        nodes.append(n)
    boxes, width, height = layout(nodes)
    return TreePage(nodes=nodes, boxes=boxes, width=width, height=height,
                    layers=sorted({r.layer for r in rows}, key=_layer_order),
                    languages=sorted({x for x in langs if x}), domains=sorted({x for x in domains if x}),
                    filters={"layer": layer, "language": language, "domain": domain})


def _layer_order(layer: str) -> int:
    return LAYERS.index(layer) if layer in LAYERS else len(LAYERS)


# ------------------------------------------------------------------------------------------------ one node
@dataclass
class Link:
    """One version of the lineage chain, master first."""

    version: VersionInfo
    files: list[tuple[str, str]]
    """(file name, blob sha256) of what the version stores."""


@dataclass
class NodePage:
    path: str
    layer: str
    version: VersionInfo
    current: bool
    """Whether the page shows the node's current version (else an older one, by ``?version=``)."""
    versions: list[Any]
    status: str
    reach: Reach | None
    chain: list[Link]
    recipe: str
    """The recipe as indented JSON."""
    datasets: list[Any]
    """`release.facts.DatasetFact` of every dataset trained into the chain."""
    perplexities: list[tuple[str, str, float]]
    """(dataset name, split, value) of the version's stored perplexities."""
    tasks: dict[str, dict[str, float]]
    other_metrics: list[tuple[str, float]]
    footprint: Any
    gguf: dict | str | None
    """llama.cpp footprints per GGUF type, or the reason the writer refused the version."""
    plot: Plot | None
    plot_note: str | None
    rounds: list[Any]
    releases: list[Any]
    licensing: Any
    children: list[str] = field(default_factory=list)


def node_page(ws: Workspace, path: str, version: str | None = None) -> NodePage:
    """Everything recorded about one node's version (its current one unless ``version`` names another)."""
    from ..evaluate.suites import task_summary
    from ..footprint import PREFIX, stored, stored_llamacpp
    from ..licenses import licensing
    from ..release.facts import dataset_facts
    from ..update.service import rounds

    node = ws.node(path)
    if node is None:
        raise NotFound(f"no node {path!r} in the registry")
    ref = f"{path}@{version}" if version else path
    try:
        v = ws.resolve_version(ref)
    except StemmaError as e:
        raise NotFound(str(e)) from None
    if v.row.node_path != path:
        raise NotFound(f"{ref} is a version of {v.row.node_path}, not of {path}")
    chain = ws.chain(v.id)
    facts = dataset_facts(ws, tuple(chain))
    names = {d.id: d.name for d in facts}
    perplexities, other = [], []
    for m in ws.metrics_of(v.id):
        if m.name == "perplexity" and m.dataset_id:
            perplexities.append((names.get(m.dataset_id) or ws.resolve_dataset(m.dataset_id).name, m.split, m.value))
        elif not m.name.startswith(("task:", PREFIX)):
            other.append((m.name, m.value))
    current = v.id == node.current_version
    row = next((r for r in tree_rows(ws) if r.path == path), None) if current else None  # status: of the current
    plot, note = _tradeoff(ws, path, current)
    return NodePage(
        path=path, layer=node.layer, version=v, current=current,
        versions=ws.versions_of(path), status=row.status if row else "",
        reach=reach(ws).get(v.id),
        chain=[Link(c, sorted(c.manifest["files"].items())) for c in chain],
        recipe=json.dumps(v.manifest.get("recipe"), indent=2, sort_keys=True, default=str),
        datasets=list(facts), perplexities=sorted(perplexities), tasks=task_summary(ws, v.id),
        other_metrics=sorted(other), footprint=stored(ws, v.id), gguf=stored_llamacpp(ws, v.id),
        plot=plot, plot_note=note, rounds=rounds(ws, path), releases=releases(ws, v.id),
        licensing=licensing(ws, v.id),
        children=sorted(n.path for n in ws.nodes() if n.parent_path == path))


def _tradeoff(ws: Workspace, path: str, current: bool) -> tuple[Plot | None, str | None]:
    """The trade-off plot of the node and its variants, from stored numbers (or why there is none)."""
    from ..tradeoff import tradeoff_points

    if not current:
        return None, "the trade-off plot shows the node's current version and its variants"
    try:
        points = tradeoff_points(ws, path, measure=False)
    except StemmaError as e:
        return None, str(e)
    if len(points) < 2:
        return None, "no variants with a stored perplexity on this node's test split"
    return tradeoff_plot(points), None


def releases(ws: Workspace, version_id: str) -> list[Any]:
    """The `releases` rows of a version, newest first (what `stemma release` recorded, its card metadata)."""
    from ..registry.tables import Release

    with ws.db.session() as s:
        return list(s.scalars(select(Release).where(Release.version_id == version_id).order_by(Release.id.desc())))


# ------------------------------------------------------------------------------------------------ playground
def playground_models(ws: Workspace) -> list[str]:
    """The nodes the playground offers: every node with a current version, in tree order."""
    return [r.path for r in tree_rows(ws) if r.version is not None]
