"""Lineage queries: the chain to the master, descendants, staleness, and the per-node table `stemma tree` shows."""

from __future__ import annotations

from dataclasses import dataclass

from .workspace import VersionInfo, Workspace


@dataclass
class NodeRow:
    path: str
    layer: str
    depth: int
    version: VersionInfo | None
    relation: str | None
    params: int | None
    own_params: int | None
    bytes: int | None
    ppl_own: float | None
    """This version on its own test split."""
    parent_ppl_own: float | None
    """The parent version on this node's test split."""
    ppl_parent_split: float | None
    """This version on the parent's test split."""
    parent_ppl_parent_split: float | None
    """The parent on its own test split."""
    status: str

    @property
    def forgetting(self) -> float | None:
        """Relative rise of perplexity on the parent's split (0.05 = 5% worse than the parent)."""
        if self.ppl_parent_split is None or not self.parent_ppl_parent_split:
            return None
        return self.ppl_parent_split / self.parent_ppl_parent_split - 1

    @property
    def gain(self) -> float | None:
        """Relative change of perplexity on the own split against the parent (negative = better)."""
        if self.ppl_own is None or not self.parent_ppl_own:
            return None
        return self.ppl_own / self.parent_ppl_own - 1


def ancestors(ws: Workspace, version_id: str) -> list[VersionInfo]:
    """Root first, ending with the version itself."""
    return ws.chain(version_id)


def tree_rows(ws: Workspace, forgetting_limit: float = 0.15) -> list[NodeRow]:
    nodes = {n.path: n for n in ws.nodes()}
    children: dict[str | None, list[str]] = {}
    for n in nodes.values():
        parent = n.parent_path if n.parent_path in nodes else None
        children.setdefault(parent, []).append(n.path)
    rows: list[NodeRow] = []

    def visit(path: str, depth: int, parent_stale: bool = False) -> None:
        n = nodes[path]
        v = ws.version(n.current_version) if n.current_version else None
        row = NodeRow(path=path, layer=n.layer, depth=depth, version=v, relation=None, params=None, own_params=None,
                      bytes=None, ppl_own=None, parent_ppl_own=None, ppl_parent_split=None,
                      parent_ppl_parent_split=None, status="not built")
        if v is not None:
            row.relation, row.params = v.row.relation, v.row.params
            row.own_params, row.bytes = v.row.own_params, v.row.bytes
            ds = ws.version_datasets(v.id)
            own = ds.get("train")
            if own:
                row.ppl_own = ws.get_metric(v.id, "perplexity", own, "test")
            status = "ok"
            parent_id = ws.tree_parent_id(v.id)
            if parent_id:
                parent = nodes.get(n.parent_path) if n.parent_path else None
                pds = ws.version_datasets(parent_id).get("train")
                if own:
                    row.parent_ppl_own = ws.get_metric(parent_id, "perplexity", own, "test")
                if pds:
                    row.ppl_parent_split = ws.get_metric(v.id, "perplexity", pds, "test")
                    row.parent_ppl_parent_split = ws.get_metric(parent_id, "perplexity", pds, "test")
                if parent_stale or (parent is not None and parent.current_version != parent_id):
                    status = "stale"  # its parent moved on (an accepted update, a rebuild), or an ancestor did
                elif row.forgetting is not None and row.forgetting > forgetting_limit:
                    status = "forgetting"
            row.status = status
        rows.append(row)
        for c in sorted(children.get(path, [])):
            visit(c, depth + 1, row.status == "stale")

    for root in sorted(children.get(None, [])):
        visit(root, 0)
    return rows
