"""What a version is and how it loads; lineage queries: the chain to the master, staleness, the tree table.

`LoadPlan` is the one answer to "what is this version": full weights, an adapter, or a compressed variant; the
version whose files give the weights (the base), the adapters applied on top of it, and the loader. It is
computed once per version (versions are immutable) by `Workspace.plan`, and loading, serving, export, update
candidates and footprints all consume it instead of looking at file names themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import StemmaError, TokenizerMismatchError

if TYPE_CHECKING:
    from .workspace import VersionInfo, Workspace

FULL, ADAPTER, VARIANT = "full", "adapter", "variant"


def version_kind(manifest: dict[str, Any]) -> str:
    """``full`` (Hugging Face weights), ``adapter`` (a PEFT delta on its parent) or ``variant`` (stemma's compressed
    format, standalone), from the files a version stores."""
    files = manifest["files"]
    if "variant.json" in files:
        return VARIANT
    if "adapter_model.safetensors" in files:
        return ADAPTER
    if "model.safetensors" in files:
        return FULL
    raise StemmaError(f"version of {manifest.get('node')} stores no weights stemma knows ({', '.join(files)})")


@dataclass(frozen=True)
class VersionRef:
    """A frozen reference to one version: enough to load, hash, or name it without another registry query."""

    id: str
    node: str
    relation: str
    kind: str
    """`FULL`, `ADAPTER` or `VARIANT`."""
    tokenizer: str
    files: tuple[tuple[str, str], ...]
    """(file name, blob digest), sorted."""
    model_type: str | None
    """The Hugging Face ``model_type`` of the model it stands for."""

    @property
    def short(self) -> str:
        return self.id[:12]

    @property
    def label(self) -> str:
        return f"{self.node}@{self.short}"

    def file(self, name: str) -> str:
        return dict(self.files)[name]

    @staticmethod
    def of(v: VersionInfo) -> VersionRef:
        arch = v.manifest.get("architecture") or {}
        return VersionRef(id=v.id, node=v.row.node_path, relation=v.row.relation, kind=version_kind(v.manifest),
                          tokenizer=v.row.tokenizer, files=tuple(sorted(v.manifest["files"].items())),
                          model_type=arch.get("model_type"))


@dataclass(frozen=True)
class LoadPlan:
    """How a version's model is put together: the base's weights, then each adapter merged in order."""

    version: VersionRef
    base: VersionRef
    """The nearest version at or above this one whose files hold whole weights (full or variant)."""
    adapters: tuple[VersionRef, ...]
    """Adapters from the base's child down to this version (empty for full and variant versions)."""

    @property
    def kind(self) -> str:
        return self.version.kind

    @property
    def loader(self) -> str:
        """``hf`` (transformers + PEFT) or ``variant`` (`stemma.compress.layers.load_variant`)."""
        return "variant" if self.base.kind == VARIANT else "hf"

    @property
    def parts(self) -> tuple[VersionRef, ...]:
        """Every version whose files loading reads, base first."""
        return (self.base, *self.adapters)

    def digests(self) -> list[str]:
        return [d for p in self.parts for _, d in p.files]


def make_plan(chain: list[VersionInfo]) -> LoadPlan:
    """The load plan of ``chain[-1]`` from its model chain (root first, update-replaced versions dropped)."""
    refs = [VersionRef.of(v) for v in chain]
    me = refs[-1]
    start = next((i for i in range(len(refs) - 1, -1, -1) if refs[i].kind != ADAPTER), None)
    if start is None:
        raise StemmaError(f"{me.label}: no ancestor stores full weights; the registry is incomplete")
    base, adapters = refs[start], tuple(refs[start + 1:])
    if adapters and base.kind == VARIANT:
        raise StemmaError(f"{me.label}: an adapter on the compressed variant {base.label} cannot be loaded; train "
                          "adapters on full-weight versions")
    for a in adapters:
        if a.tokenizer != base.tokenizer:
            raise TokenizerMismatchError(f"{a.label}: adapter tokenizer {a.tokenizer[:12]} differs from its base "
                                         f"{base.label}'s {base.tokenizer[:12]}; refusing to apply it")
    return LoadPlan(version=me, base=base, adapters=adapters)


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


def row_parents(rows: list[NodeRow]) -> list[str | None]:
    """Each row's parent row's path (rows are depth-first: a row's parent is the last row one level up)."""
    last: dict[int, str] = {}
    parents = []
    for r in rows:
        parents.append(last.get(r.depth - 1) if r.depth else None)
        last[r.depth] = r.path
    return parents


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
