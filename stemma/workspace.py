"""A stemma installation: settings + blob store + registry, and the operations that touch more than one.

Every write follows the same order: blobs first (idempotent, content-addressed), then one registry
transaction that makes them visible. A crash in between leaves only unreferenced blobs, which `stemma fsck`
reports as orphans; the registry never points at something that is not fully written.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .data.ingest import BuiltDataset, IngestOptions, built_from, curation_for, read_docs
from .errors import StemmaError
from .registry.db import Database
from .registry.locks import Locks
from .registry.tables import Dataset, Metric, Node, Round, Update, Version, VersionDataset
from .settings import Settings, load_settings
from .store import BlobStore, FsckReport

_HEX = re.compile(r"^[0-9a-f]{4,64}$")


@dataclass
class VersionInfo:
    """A registry row with its manifest (plain data for the layers above)."""

    row: Version
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.row.id

    @property
    def short(self) -> str:
        return self.row.id[:12]

    @property
    def label(self) -> str:
        """``node@short id``, as every message and table names a version."""
        return f"{self.row.node_path}@{self.short}"


class Workspace:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = BlobStore(settings.store_dir)
        self.db = Database(settings.registry_url)
        self.locks = Locks(self.db)
        self._plans: dict[str, Any] = {}  # version id -> LoadPlan (versions are immutable)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def init(cls, home: str | Path | None = None) -> Workspace:
        s = load_settings(home)
        s.home.mkdir(parents=True, exist_ok=True)
        s.store_dir.mkdir(exist_ok=True)
        s.work_dir.mkdir(exist_ok=True)
        return cls(s)

    @classmethod
    def open(cls, home: str | Path | None = None) -> Workspace:
        s = load_settings(home)
        if not s.store_dir.is_dir():
            raise StemmaError(f"no stemma home at {s.home}; run `stemma init` (or set STEMMA_HOME)")
        return cls(s)

    def node_lock(self, node: str, purpose: str, log=None):
        """Hold node ``node`` (`stemma.registry.locks`) while building, aggregating into or otherwise publishing
        versions of it: other nodes stay free, so independent subtrees build at once."""
        return self.locks.hold(f"node:{node}", purpose, log=log)

    def curation_lock(self, curations, log=None):
        """Hold the work directories of these curations (``work/curate/<key>``): one process curates a corpus at a
        time, and none removes a directory another one still reads."""
        return self.locks.hold([f"curation:{c.work.name}" for c in curations], "curate", log=log)

    # ------------------------------------------------------------------ datasets
    def ingest(self, paths: list[Path], opts: IngestOptions, executor=None, references: tuple[str, ...] = (),
               reporter=None) -> tuple[Dataset, bool]:
        """Ingest a corpus; returns the dataset row and whether it is new (same content: same id, no-op).

        The run works in ``work/curate/`` and resumes there if it was killed; the directory goes once registered."""
        cur = curation_for(paths, opts, self.settings.work_dir / "curate", executor=executor, reporter=reporter)
        with self.curation_lock([cur], log=reporter.log if reporter else None):
            built = built_from(opts, cur, references)
            row, new = self.register_dataset(built)
            shutil.rmtree(cur.work, ignore_errors=True)
        return row, new

    def register_dataset(self, built: BuiltDataset) -> tuple[Dataset, bool]:
        if self.store.put_file(built.train_path) != built.manifest["train"]:
            raise StemmaError(f"dataset {built.manifest['name']}: training split changed while it was stored")
        if self.store.put_file(built.test_path) != built.manifest["test"]:
            raise StemmaError(f"dataset {built.manifest['name']}: test split changed while it was stored")
        ds_id = self.store.put_json(built.manifest)

        def register(s) -> tuple[Dataset, bool]:
            row = s.get(Dataset, ds_id)
            if row is not None:
                return row, False
            seq = (s.scalar(select(Dataset.seq).where(Dataset.name == built.manifest["name"])
                            .order_by(Dataset.seq.desc()).limit(1)) or 0) + 1
            sheet = {**built.datasheet, "run": built.run}
            row = Dataset(
                id=ds_id, name=built.manifest["name"], seq=seq, manifest=ds_id, language=sheet.get("language"),
                license=(sheet.get("license") or "")[:400], n_docs=sheet["counts"]["documents"],
                n_train=sheet["counts"]["train_documents"], n_test=sheet["counts"]["test_documents"], datasheet=sheet,
            )
            s.add(row)
            s.flush()
            return row, True

        # Another writer may take the next sequence number (or register the same dataset) meanwhile: read again.
        return self.db.retrying(register)

    def resolve_dataset(self, ref: str) -> Dataset:
        """``name`` (newest), ``name@seq``, ``name@idprefix`` or an id prefix."""
        with self.db.session() as s:
            name, _, pin = ref.partition("@")
            q = select(Dataset).where(Dataset.name == name)
            if pin:
                if pin.isdigit() and len(pin) < 4:
                    q = q.where(Dataset.seq == int(pin))
                else:
                    q = q.where(Dataset.id.startswith(pin))
            rows = list(s.scalars(q.order_by(Dataset.seq.desc())))
            if not rows and _HEX.match(ref):
                rows = list(s.scalars(select(Dataset).where(Dataset.id.startswith(ref))))
                if len(rows) > 1:
                    raise StemmaError(f"dataset id prefix {ref!r} is ambiguous")
            if not rows:
                raise StemmaError(f"unknown dataset {ref!r}; see `stemma data list`")
            return rows[0]

    def list_datasets(self) -> list[Dataset]:
        with self.db.session() as s:
            return list(s.scalars(select(Dataset).order_by(Dataset.name, Dataset.seq)))

    def dataset_manifest(self, ds_id: str) -> dict[str, Any]:
        return self.store.get_json(ds_id)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - the workspace lives as long as the process
    def dataset_texts(self, ds_id: str, split: str) -> tuple[str, ...]:
        if split not in ("train", "test"):
            raise ValueError(split)
        m = self.dataset_manifest(ds_id)
        return tuple(d["text"] for d in read_docs(self.store.get_bytes(m[split])))

    # ------------------------------------------------------------------ versions
    def resolve_version(self, ref: str) -> VersionInfo:
        """``node`` (its current version), ``node@idprefix``, or a version id prefix."""
        with self.db.session() as s:
            node, _, pin = ref.partition("@")
            row = None
            if pin:
                rows = list(s.scalars(select(Version).where(Version.node_path == node, Version.id.startswith(pin))))
                if len(rows) > 1:
                    raise StemmaError(f"version prefix {pin!r} of {node} is ambiguous")
                row = rows[0] if rows else None
            else:
                n = s.get(Node, node)
                if n is not None and n.current_version:
                    row = s.get(Version, n.current_version)
                elif _HEX.match(ref):
                    rows = list(s.scalars(select(Version).where(Version.id.startswith(ref))))
                    if len(rows) > 1:
                        raise StemmaError(f"version id prefix {ref!r} is ambiguous")
                    row = rows[0] if rows else None
            if row is None:
                raise StemmaError(f"unknown node or version {ref!r}; see `stemma tree`")
        return VersionInfo(row=row, manifest=self.store.get_json(row.id))

    def version(self, version_id: str) -> VersionInfo:
        with self.db.session() as s:
            row = s.get(Version, version_id)
        if row is None:
            raise StemmaError(f"unknown version {version_id[:12]}")
        return VersionInfo(row=row, manifest=self.store.get_json(row.id))

    def find_by_recipe(self, node: str, recipe_key: str) -> Version | None:
        with self.db.session() as s:
            return s.scalar(select(Version).where(Version.node_path == node, Version.recipe_key == recipe_key))

    def nodes(self) -> list[Node]:
        with self.db.session() as s:
            return list(s.scalars(select(Node).order_by(Node.path)))

    def node(self, path: str) -> Node | None:
        with self.db.session() as s:
            return s.get(Node, path)

    def versions_of(self, node: str) -> list[Version]:
        with self.db.session() as s:
            return list(s.scalars(select(Version).where(Version.node_path == node).order_by(Version.created_at)))

    def version_datasets(self, version_id: str) -> dict[str, str]:
        with self.db.session() as s:
            rows = s.scalars(select(VersionDataset).where(VersionDataset.version_id == version_id))
            return {r.role: r.dataset_id for r in rows}

    def register_version(
        self, manifest: dict[str, Any], *, layer: str, parent_path: str | None, datasets: dict[str, str],
        params: int, own_params: int, make_current: bool = True, also: Callable[[Session, str], None] | None = None,
    ) -> VersionInfo:
        """Publish a version whose files are already in the store: one transaction, all or nothing.

        A node has one version per recipe: when another writer published this node's recipe first, its version
        stands and is the one returned (and made current). ``also(session, version_id)`` runs in the same
        transaction (an update round is recorded with the version it made)."""
        for digest in list(manifest["files"].values()) + [manifest["tokenizer"]]:
            if not self.store.has(digest):
                raise StemmaError(f"cannot register {manifest['node']}: blob {digest[:12]} is not in the store")
        vid = self.store.put_json(manifest)
        nbytes = sum(self.store.size(d) for d in manifest["files"].values())

        def register(s) -> str:
            node = s.get(Node, manifest["node"])
            if node is None:
                node = Node(path=manifest["node"], layer=layer, parent_path=parent_path)
                s.add(node)
            else:
                node.layer, node.parent_path = layer, parent_path
            row = s.get(Version, vid) or s.scalar(select(Version).where(
                Version.node_path == manifest["node"], Version.recipe_key == manifest["recipe_key"]))
            if row is None:
                row = Version(
                    id=vid, node_path=manifest["node"], parent_id=manifest.get("parent"),
                    derived_from=(manifest.get("train") or {}).get("rebased_from"),
                    relation=manifest["relation"], method=manifest["method"], recipe_key=manifest["recipe_key"],
                    tokenizer=manifest["tokenizer"], params=params, own_params=own_params, bytes=nbytes,
                    files=manifest["files"],
                )
                s.add(row)
                s.flush()
                for role, ds in sorted(datasets.items()):
                    s.add(VersionDataset(version_id=vid, dataset_id=ds, role=role))
            if make_current:
                node.current_version = row.id
            if also is not None:
                also(s, row.id)
            return row.id

        # Another writer may register the node, the same version or the same recipe meanwhile: read again.
        return self.version(self.db.retrying(register))

    def set_current(self, node: str, version_id: str, layer: str, parent_path: str | None) -> None:
        def point(s) -> None:
            n = s.get(Node, node)
            if n is None:
                s.add(Node(path=node, layer=layer, parent_path=parent_path, current_version=version_id))
            else:
                n.current_version, n.layer, n.parent_path = version_id, layer, parent_path

        self.db.retrying(point)

    def update_head(self, node: str, version_id: str) -> str:
        """The node's current version if it descends from ``version_id`` by accepted updates only, else the id."""
        n = self.node(node)
        if n is None or not n.current_version or n.current_version == version_id:
            return version_id
        cur, seen = n.current_version, set()
        while cur and cur not in seen:
            seen.add(cur)
            v = self.version(cur)
            if v.row.relation != "update" or v.row.node_path != node:
                return version_id
            cur = v.row.parent_id
            if cur == version_id:
                return n.current_version
        return version_id

    def set_gate(self, node: str, gate: dict | None) -> None:
        with self.db.session() as s:
            n = s.get(Node, node)
            if n is not None and n.gate != gate:
                n.gate = gate

    # ------------------------------------------------------------------ metrics
    def get_metric(self, version_id: str, name: str, dataset_id: str | None, split: str | None) -> float | None:
        with self.db.session() as s:
            m = s.scalar(select(Metric).where(Metric.version_id == version_id, Metric.name == name,
                                              Metric.dataset_id == dataset_id, Metric.split == split))
            return None if m is None else m.value

    def put_metric(self, version_id: str, name: str, dataset_id: str | None, split: str | None, value: float,
                   details: dict | None = None) -> None:
        def put(s) -> None:
            m = s.scalar(select(Metric).where(Metric.version_id == version_id, Metric.name == name,
                                              Metric.dataset_id == dataset_id, Metric.split == split))
            if m is None:
                s.add(Metric(version_id=version_id, name=name, dataset_id=dataset_id, split=split, value=value,
                             details=details))
            else:
                m.value, m.details = value, details

        self.db.retrying(put)  # two processes measuring one metric: the second updates the first one's row

    def metrics_of(self, version_id: str) -> list[Metric]:
        with self.db.session() as s:
            return list(s.scalars(select(Metric).where(Metric.version_id == version_id).order_by(Metric.id)))

    # ------------------------------------------------------------------ loading
    def tokenizer(self, digest: str):
        from .models.tokenizer import tokenizer_from_bytes

        return tokenizer_from_bytes(self.store.get_bytes(digest))

    def chain(self, version_id: str) -> list[VersionInfo]:
        """The version and its ancestors, root first."""
        out, cur, seen = [], version_id, set()
        while cur:
            if cur in seen:
                raise StemmaError(f"lineage cycle at {cur[:12]}; the registry is corrupt")
            seen.add(cur)
            v = self.version(cur)
            out.append(v)
            cur = v.row.parent_id
        return out[::-1]

    def tree_parent_id(self, version_id: str) -> str | None:
        """The version of the parent node this version derives from (past the node's own accepted updates)."""
        v = self.version(version_id)
        while v.row.relation == "update" and v.row.parent_id:
            p = self.version(v.row.parent_id)
            if p.row.node_path != v.row.node_path:
                break
            v = p
        return v.row.parent_id

    def model_chain(self, version_id: str) -> list[VersionInfo]:
        """The chain that makes up a version's model, root first: like `chain`, without the versions an accepted
        update replaced (an update version stores its node's whole model: full weights or the whole adapter)."""
        chain = self.chain(version_id)
        return [v for i, v in enumerate(chain)
                if not (i + 1 < len(chain) and chain[i + 1].row.relation == "update"
                        and chain[i + 1].row.node_path == v.row.node_path)]

    def plan(self, version_id: str):
        """The version's `stemma.lineage.LoadPlan` (what it is, its base and adapter chain), computed once."""
        from .lineage import make_plan

        hit = self._plans.get(version_id)
        if hit is None:
            hit = self._plans[version_id] = make_plan(self.model_chain(version_id))
        return hit

    def materialise(self, ref, into: Path) -> Path:
        """Lay out one version's verified blobs under their file names in ``into`` (symlinks into the store)."""
        from .models.io import materialise

        return materialise({n: self.store.verified_path(d) for n, d in ref.files}, into)

    def load_model(self, version_id: str, merge: bool = True, below: bool = False):
        """The model a version stands for, as a plain transformers model (adapter chain merged).

        Follows the version's `plan`: the base's weights (Hugging Face safetensors, or a compressed variant through
        `stemma.compress.layers.load_variant`), then each adapter applied in order. With ``merge=False`` the last
        adapter stays a PEFT adapter (the ones above it are merged). With ``below``, an adapter version's model
        without its own adapter: what that adapter applies to.
        """
        from .models.io import apply_adapter, load_hf_dir

        plan = self.plan(version_id)
        if below:
            if not plan.adapters:
                raise StemmaError(f"{plan.version.label} is not an adapter")
            plan = type(plan)(version=plan.adapters[-1], base=plan.base, adapters=plan.adapters[:-1])
        with tempfile.TemporaryDirectory(prefix="stemma-load-") as d:
            target = self.materialise(plan.base, Path(d) / "base")
            if plan.loader == "variant":
                from .compress.layers import load_variant

                model = load_variant({n: target / n for n, _ in plan.base.files})
            else:
                model = load_hf_dir(target)
            for i, a in enumerate(plan.adapters):
                last = i == len(plan.adapters) - 1
                model = apply_adapter(model, self.materialise(a, Path(d) / f"a{i}"), merge=merge or not last)
        model.eval()
        return model

    # ------------------------------------------------------------------ integrity
    def referenced_digests(self) -> set[str]:
        refs: set[str] = set()
        with self.db.session() as s:
            for d in s.scalars(select(Dataset)):
                refs.add(d.manifest)
                try:
                    m = self.store.get_json(d.manifest)
                    refs.update([m["train"], m["test"]])
                except StemmaError:
                    pass
            for v in s.scalars(select(Version)):
                refs.add(v.id)
                refs.add(v.tokenizer)
                refs.update(v.files.values())
            for u in s.scalars(select(Update)):
                refs.add(u.id)
            for n in s.scalars(select(Node)):  # task definitions, with the tasks a robustness task perturbs
                for t in n.tasks or []:
                    refs.update(t["blobs"])
            for r in s.scalars(select(Round)):
                refs.add(r.delta)
                if (r.config or {}).get("heldout"):
                    refs.add(r.config["heldout"])
        return refs

    def fsck(self) -> FsckReport:
        """The store's blobs against what the registry references, then the registry against itself."""
        report = self.store.fsck(self.referenced_digests())
        report.inconsistent = self.registry_problems()
        report.stale_locks = self.stale_locks()
        return report

    def registry_problems(self) -> list[str]:
        """What concurrent writers must never leave behind: a node whose alias points at no version of its own, two
        versions of one recipe, an update used by no round or by two, a round whose updates are not marked as its
        own, an accepted round without its version."""
        out = []
        with self.db.session() as s:
            versions = {v.id: v for v in s.scalars(select(Version))}
            for n in s.scalars(select(Node).order_by(Node.path)):
                v = versions.get(n.current_version) if n.current_version else None
                if n.current_version and (v is None or v.node_path != n.path):
                    out.append(f"node {n.path}: current version {n.current_version[:12]} is not one of its versions")
            recipes: dict[tuple[str, str], list[str]] = {}
            for v in versions.values():
                recipes.setdefault((v.node_path, v.recipe_key), []).append(v.id[:12])
            out += [f"node {node}: recipe {key[:12]} has {len(ids)} versions ({', '.join(sorted(ids))})"
                    for (node, key), ids in sorted(recipes.items()) if len(ids) > 1]
            used: dict[str, list[str]] = {}
            for r in s.scalars(select(Round).order_by(Round.created_at)):
                if r.accepted and (r.version_id not in versions or versions[r.version_id].relation != "update"):
                    out.append(f"round {r.id[:12]}: accepted, but its version {str(r.version_id)[:12]} is missing")
                if r.source_round is None:  # an offer to a sibling reuses the source round's updates
                    for uid in r.update_ids:
                        used.setdefault(uid, []).append(r.id)
            for u in s.scalars(select(Update).order_by(Update.created_at)):
                rounds = used.pop(u.id, [])
                if len(rounds) > 1:
                    names = ", ".join(r[:12] for r in rounds)
                    out.append(f"update {u.id[:12]}: used by {len(rounds)} rounds ({names})")
                elif u.status == "used" and rounds != [u.round_id]:
                    out.append(f"update {u.id[:12]}: marked used by round {str(u.round_id)[:12]}, which does not "
                               "list it")
                elif u.status == "pending" and rounds:
                    out.append(f"update {u.id[:12]}: pending, but round {rounds[0][:12]} used it")
            out += [f"round {rs[0][:12]}: lists update {uid[:12]}, which is not registered" for uid, rs in used.items()]
        return out

    def stale_locks(self, watch_s: float | None = None) -> list[str]:
        """Locks whose holder is stale: on this host, a process that is gone or a heartbeat older than the stale
        limit (one clock); on another host, beats that stand still while this watches them for ``watch_s`` (a
        heartbeat and a second; no two hosts' clocks are compared)."""
        import time
        from datetime import UTC, datetime

        from .registry import locks

        now, limit = datetime.now(UTC), locks.stale_after()
        out, elsewhere = [], []
        for h in self.locks.holders():
            beat = h.heartbeat_at if h.heartbeat_at.tzinfo else h.heartbeat_at.replace(tzinfo=UTC)
            if h.host != locks.HOST:
                elsewhere.append(h)
            elif h.dead_here():
                out.append(f"lock {h.name}: {h.who}; that process is gone")
            elif (now - beat).total_seconds() > limit:
                out.append(f"lock {h.name}: {h.who}; no heartbeat for {(now - beat).total_seconds():.0f} s")
        if elsewhere:
            watch_s = locks.HEARTBEAT_S + 1 if watch_s is None else watch_s
            time.sleep(watch_s)
            again = {h.name: h for h in self.locks.holders()}
            for h in elsewhere:
                g = again.get(h.name)
                if g is not None and (g.token, g.beats) == (h.token, h.beats):
                    out.append(f"lock {h.name}: {h.who}; its heartbeat did not move in the {watch_s:g} s this "
                               "watched it")
        return out

    def work_dir_for(self, key: str) -> Path:
        p = self.settings.work_dir / key
        p.mkdir(parents=True, exist_ok=True)
        return p


def env_home() -> str | None:
    return os.environ.get("STEMMA_HOME")
