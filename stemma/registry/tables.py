"""Registry tables (SQLAlchemy 2.0, portable across SQLite and PostgreSQL).

The registry indexes what the blob store holds: nodes of the tree, immutable versions and datasets (each
identified by the sha256 of its manifest), the datasets a version was trained on, and its metrics. The
manifests themselves live in the store; the rows here make queries cheap and let a single transaction
publish a version (so a crash never leaves one half-registered).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


DIGEST = String(64)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    """sha256 of the dataset manifest."""
    name: Mapped[str] = mapped_column(String(200), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    """1, 2, ... per name: the newest is the one a bare name resolves to."""
    manifest: Mapped[str] = mapped_column(DIGEST)
    """Digest of the manifest blob (equal to ``id``; kept explicit for fsck)."""
    language: Mapped[str | None] = mapped_column(String(32))
    license: Mapped[str | None] = mapped_column(String(400))
    n_docs: Mapped[int] = mapped_column(Integer)
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    datasheet: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("name", "seq", name="uq_dataset_name_seq"),)


class Node(Base):
    __tablename__ = "nodes"

    path: Mapped[str] = mapped_column(String(300), primary_key=True)
    layer: Mapped[str] = mapped_column(String(32))
    parent_path: Mapped[str | None] = mapped_column(String(300))
    current_version: Mapped[str | None] = mapped_column(DIGEST)
    """The alias: which version of this node is current."""
    gate: Mapped[dict | None] = mapped_column(JSON)
    """The node's update gate as declared in stemma.yaml (recorded by `stemma build`)."""
    tasks: Mapped[list | None] = mapped_column(JSON)
    """The node's evaluation tasks: ``[{id, kind, suites, definition}]``, each definition a blob (`stemma build`)."""
    release_gate: Mapped[dict | None] = mapped_column(JSON)
    """The node's release gate as declared in stemma.yaml (recorded by `stemma build`; `stemma check` reads it)."""
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Version(Base):
    __tablename__ = "versions"

    id: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    """sha256 of the version manifest."""
    node_path: Mapped[str] = mapped_column(String(300), ForeignKey("nodes.path"), index=True)
    parent_id: Mapped[str | None] = mapped_column(DIGEST, ForeignKey("versions.id"), index=True)
    derived_from: Mapped[str | None] = mapped_column(DIGEST, ForeignKey("versions.id"), index=True)
    """A version other than the parent whose weights this one was made from (a rebase starts from the child's
    previous version): risk flags follow this edge as they follow ``parent_id``."""
    relation: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(64))
    recipe_key: Mapped[str] = mapped_column(DIGEST, index=True)
    """Hash of (parent version, datasets, method, config): equal key, equal build."""
    tokenizer: Mapped[str] = mapped_column(DIGEST)
    params: Mapped[int] = mapped_column(BigInteger)
    """Parameters of the model this version loads as (for an adapter: base + delta)."""
    own_params: Mapped[int] = mapped_column(BigInteger)
    """Parameters stored by this version itself (for an adapter: the delta only)."""
    bytes: Mapped[int] = mapped_column(BigInteger)
    """Bytes this version adds to the store (its own files)."""
    files: Mapped[dict] = mapped_column(JSON)
    """File name -> blob digest."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("node_path", "recipe_key", name="uq_version_node_recipe"),)
    """One version per recipe of a node: two builders that race for a recipe publish it once (the database says
    which one won)."""


class VersionDataset(Base):
    __tablename__ = "version_datasets"

    version_id: Mapped[str] = mapped_column(DIGEST, ForeignKey("versions.id"), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(DIGEST, ForeignKey("datasets.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(32), primary_key=True)
    """``train`` (the node's own data) or ``replay`` (parent data used to control forgetting)."""


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[str] = mapped_column(DIGEST, ForeignKey("versions.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str | None] = mapped_column(DIGEST, ForeignKey("datasets.id"))
    split: Mapped[str | None] = mapped_column(String(16))
    value: Mapped[float] = mapped_column(Float)
    details: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("version_id", "name", "dataset_id", "split", name="uq_metric"),)


class Contributor(Base):
    """A party allowed to send updates to one node, identified by its ed25519 public key."""

    __tablename__ = "contributors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_path: Mapped[str] = mapped_column(String(300), ForeignKey("nodes.path"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    public_key: Mapped[str] = mapped_column(String(64))
    """Raw ed25519 public key, hex."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the key was revoked (`stemma update revoke`): updates signed by it are refused from then on."""
    revoked_by: Mapped[str | None] = mapped_column(String(200))
    revoked_reason: Mapped[str | None] = mapped_column(String(2000))

    __table_args__ = (UniqueConstraint("node_path", "name", name="uq_contributor_node_name"),)


class Update(Base):
    """A verified update submitted against one version of a node (the signed file is a blob in the store)."""

    __tablename__ = "updates"

    id: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    """sha256 of the signed update file."""
    node_path: Mapped[str] = mapped_column(String(300), ForeignKey("nodes.path"), index=True)
    parent_id: Mapped[str] = mapped_column(DIGEST, ForeignKey("versions.id"), index=True)
    """The version the update was trained against."""
    contributor_id: Mapped[int] = mapped_column(Integer, ForeignKey("contributors.id"))
    kind: Mapped[str] = mapped_column(String(16))
    """``lora`` (trained as an adapter, sent as its dense product) or ``full``."""
    n_examples: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    header: Mapped[dict] = mapped_column(JSON)
    """The signed header, plus ``received``: what the server recorded (signed digest, delta digest, scan)."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """``pending`` until a round uses it, then ``used``; ``excluded`` when a round left it out (revoked key)."""
    round_id: Mapped[str | None] = mapped_column(DIGEST)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Round(Base):
    """One aggregation of updates into a candidate for a node, with the gate's verdict and reasons."""

    __tablename__ = "rounds"

    id: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    """sha256 of the round's record (target, strategy, updates, aggregate)."""
    node_path: Mapped[str] = mapped_column(String(300), ForeignKey("nodes.path"), index=True)
    """The node the aggregate was applied to (the updates' node, or a sibling it was offered to)."""
    parent_id: Mapped[str] = mapped_column(DIGEST, ForeignKey("versions.id"))
    source_round: Mapped[str | None] = mapped_column(DIGEST)
    """For an offer to a sibling: the accepted round whose aggregate is offered."""
    strategy: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict] = mapped_column(JSON)
    """Strategy and gate settings used."""
    update_ids: Mapped[list] = mapped_column(JSON)
    selected: Mapped[list] = mapped_column(JSON)
    """Update ids the strategy kept."""
    delta: Mapped[str] = mapped_column(DIGEST)
    """Blob of the aggregated delta (safetensors)."""
    accepted: Mapped[bool] = mapped_column(Boolean)
    reasons: Mapped[list] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    version_id: Mapped[str | None] = mapped_column(DIGEST, ForeignKey("versions.id"))
    """The new version (relation ``update``) when accepted."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Flag(Base):
    """A risk flag on a dataset or a version: it reaches every version derived from its target.

    Flags are never deleted: `stemma unflag` records who cleared one, when and why.
    """

    __tablename__ = "flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(16))
    """``dataset`` or ``version``."""
    target_id: Mapped[str] = mapped_column(DIGEST, index=True)
    severity: Mapped[str] = mapped_column(String(16))
    """``low``, ``high`` or ``critical``."""
    reason: Mapped[str] = mapped_column(String(2000))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    cleared_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cleared_by: Mapped[str | None] = mapped_column(String(200))
    cleared_reason: Mapped[str | None] = mapped_column(String(2000))


class App(Base):
    """A prompt template bound to a node (or to ``auto`` with requirements), served as model ``app:NAME``."""

    __tablename__ = "apps"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    node_path: Mapped[str | None] = mapped_column(String(300))
    """The node the app answers with; None for ``auto`` (then ``requirements`` choose)."""
    requirements: Mapped[dict | None] = mapped_column(JSON)
    template: Mapped[str] = mapped_column(String(20000))
    description: Mapped[str | None] = mapped_column(String(2000))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Release(Base):
    """A signed release written by `stemma release` (the directory itself lives wherever it was written)."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[str] = mapped_column(DIGEST, ForeignKey("versions.id"), index=True)
    format: Mapped[str] = mapped_column(String(16))
    license: Mapped[str] = mapped_column(String(400))
    bom_digest: Mapped[str] = mapped_column(DIGEST)
    """sha256 of the release's ML-BOM file."""
    card: Mapped[dict] = mapped_column(JSON)
    """The model card's YAML metadata as written."""
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lock(Base):
    """A named lock (``node:PATH``, ``curation:KEY``) held by one process: the row exists while it is held.

    Claimed by INSERT (the name is the key, so one claim wins); `stemma.registry.locks` keeps it beating and takes
    over the lock of an owner that is gone."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(400), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(200))
    """What the holder does under it (``build``, ``aggregate``, ``curate``), for whoever waits."""
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    token: Mapped[str] = mapped_column(String(32))
    """Random per claim: only this claim's holder beats or releases it, and a take-over replaces it."""
    beats: Mapped[int] = mapped_column(Integer, default=0)
    """Incremented by the holder every few seconds: a waiter that sees it stand still long enough takes over
    (each party judges by its own clock, so hosts' clocks need not agree)."""
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
