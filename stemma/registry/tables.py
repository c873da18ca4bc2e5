"""Registry tables (SQLAlchemy 2.0, portable across SQLite and PostgreSQL).

The registry indexes what the blob store holds: nodes of the tree, immutable versions and datasets (each
identified by the sha256 of its manifest), the datasets a version was trained on, and its metrics. The
manifests themselves live in the store; the rows here make queries cheap and let a single transaction
publish a version (so a crash never leaves one half-registered).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Version(Base):
    __tablename__ = "versions"

    id: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    """sha256 of the version manifest."""
    node_path: Mapped[str] = mapped_column(String(300), ForeignKey("nodes.path"), index=True)
    parent_id: Mapped[str | None] = mapped_column(DIGEST, ForeignKey("versions.id"), index=True)
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
