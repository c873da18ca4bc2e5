"""Risk flags on datasets and versions, and what they reach down the lineage.

A flag names a dataset or a version, a severity and a reason. It reaches the version itself (or every version
trained on the dataset, as training data or replay) and every version derived from those: children, variants,
updates, students. What a flag reaches is computed by the database in one recursive query over
``version_datasets``, ``versions.parent_id`` and ``versions.derived_from`` (the version a rebase started from) (a
recursive CTE, portable across SQLite and PostgreSQL), so the
tree, the server, the selector, apps and releases all read one answer. Flags are never deleted: clearing one
records who, when and why.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, exists, literal, or_, select

from .errors import StemmaError
from .registry.tables import Dataset, Flag, Node, Version, VersionDataset
from .settings import actor
from .workspace import Workspace

SEVERITIES = ("low", "high", "critical")


@dataclass(frozen=True)
class FlagInfo:
    id: int
    target_kind: str
    target_id: str
    target_name: str
    severity: str
    reason: str
    created_by: str
    created_at: datetime
    cleared_at: datetime | None = None
    cleared_by: str | None = None
    cleared_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.cleared_at is None

    @property
    def label(self) -> str:
        """One line naming the flag, for errors and reasons."""
        return f"flag #{self.id} ({self.severity}) on {self.target_kind} {self.target_name}: {self.reason}"


@dataclass(frozen=True)
class Affected:
    """A version a flag reaches, with the node it belongs to and whether it is that node's current version."""

    version_id: str
    node: str
    relation: str
    current: bool
    flag_ids: tuple[int, ...]
    direct: tuple[int, ...] = ()
    """The flags (or, for `impact`, 0) naming the version itself: it is the flagged version or was trained on the
    flagged dataset. The others reach it through an ancestor."""


@dataclass(frozen=True)
class Reach:
    """The active flags reaching one version, and which of them name it directly (see `Affected.direct`)."""

    flags: tuple[FlagInfo, ...]
    direct: tuple[int, ...]

    @property
    def mark(self) -> str:
        """``flagged`` (a flag names the version or a dataset it was trained on) or ``affected`` (inherited)."""
        return "flagged" if self.direct else "affected"


@dataclass(frozen=True)
class Target:
    kind: str  # dataset | version
    id: str
    name: str


def resolve_target(ws: Workspace, ref: str) -> Target:
    """``dataset:REF``, ``version:REF``, or a bare REF that names exactly one dataset or one version.

    REF is what `stemma data show` or `stemma show` accept: a name (a dataset's newest version, a node's current
    version), ``name@pin`` or an id prefix.
    """
    kind, sep, rest = ref.partition(":")
    if sep and kind in ("dataset", "version"):
        return _dataset_target(ws, rest) if kind == "dataset" else _version_target(ws, rest)
    found: list[Target] = []
    for resolve in (_dataset_target, _version_target):
        try:
            found.append(resolve(ws, ref))
        except StemmaError:
            pass
    if not found:
        raise StemmaError(f"{ref!r} names no dataset and no version; see `stemma data list` and `stemma tree`")
    if len(found) > 1:
        raise StemmaError(f"{ref!r} names both dataset {found[0].name} and version {found[1].name}: "
                          f"write dataset:{ref} or version:{ref}")
    return found[0]


def _dataset_target(ws: Workspace, ref: str) -> Target:
    ds = ws.resolve_dataset(ref)
    return Target("dataset", ds.id, f"{ds.name}@{ds.seq} ({ds.id[:12]})")


def _version_target(ws: Workspace, ref: str) -> Target:
    v = ws.resolve_version(ref)
    return Target("version", v.id, f"{v.label}")


MAX_REASON = Flag.__table__.c.reason.type.length


def _fits(reason: str) -> None:
    """A reason the registry stores whole on every database (PostgreSQL refuses a longer one, SQLite would not)."""
    if len(reason.strip()) > MAX_REASON:
        raise StemmaError(f"the reason has {len(reason.strip())} characters; at most {MAX_REASON}")


def flag(ws: Workspace, ref: str, reason: str, severity: str, by: str | None = None) -> FlagInfo:
    if severity not in SEVERITIES:
        raise StemmaError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    if not reason.strip():
        raise StemmaError("a flag needs a reason (--reason TEXT)")
    _fits(reason)
    target = resolve_target(ws, ref)
    with ws.db.session() as s:
        row = Flag(target_kind=target.kind, target_id=target.id, severity=severity, reason=reason.strip(),
                   created_by=by or actor())
        s.add(row)
        s.flush()
        info = _info(row, target.name)
    return info


def unflag(ws: Workspace, ref: str, reason: str, by: str | None = None) -> list[FlagInfo]:
    """Clear a flag by its number (``#3`` or ``3``), or every active flag on a dataset or version."""
    if not reason.strip():
        raise StemmaError("clearing a flag needs a reason (--reason TEXT)")
    _fits(reason)
    with ws.db.session() as s:
        # FOR UPDATE (PostgreSQL): a second writer clearing the same flag waits, then sees it cleared and fails
        # instead of overwriting who cleared it.
        num = ref.removeprefix("#")
        # "#N" is always a flag; a bare number of 4+ digits may be the prefix of a dataset or version id
        if num.isdigit() and (ref.startswith("#") or len(num) < 4):
            rows = [r for r in [s.get(Flag, int(num), with_for_update=True)] if r is not None]
            if not rows:
                raise StemmaError(f"no flag #{num}; see `stemma flags`")
        else:
            target = resolve_target(ws, ref)
            rows = list(s.scalars(select(Flag).where(Flag.target_id == target.id).order_by(Flag.id)
                                  .with_for_update()))
        active = [r for r in rows if r.cleared_at is None]
        if not active:
            raise StemmaError(f"{ref!r} has no active flag")
        now = datetime.now(UTC)
        for r in active:
            r.cleared_at, r.cleared_by, r.cleared_reason = now, by or actor(), reason.strip()
        s.flush()
        names = _target_names(s, active)
        return [_info(r, names[r.id]) for r in active]


def flags(ws: Workspace, include_cleared: bool = False) -> list[FlagInfo]:
    with ws.db.session() as s:
        q = select(Flag).order_by(Flag.id)
        if not include_cleared:
            q = q.where(Flag.cleared_at.is_(None))
        rows = list(s.scalars(q))
        names = _target_names(s, rows)
        return [_info(r, names[r.id]) for r in rows]


def _reach(seed):
    """(seed id, version id, node, relation, is current, direct) for every version reached from ``seed``'s versions.

    ``seed`` selects ``(flag_id, version_id, direct = 1)`` rows; the recursion follows ``versions.parent_id`` and
    ``versions.derived_from`` (a rebase's previous version) down with direct = 0.
    UNION (not UNION ALL) keeps each (flag, version, direct) row once.
    """
    v, n = Version.__table__, Node.__table__
    reached = seed.cte("reached", recursive=True)
    child = v.alias("child")
    below = or_(child.c.parent_id == reached.c.version_id, child.c.derived_from == reached.c.version_id)
    step = select(reached.c.flag_id, child.c.id, literal(0)).join(child, below)
    reached = reached.union(step)
    return (
        select(reached.c.flag_id, v.c.id, v.c.node_path, v.c.relation, (n.c.current_version == v.c.id).label("cur"),
               reached.c.direct)
        .join(v, v.c.id == reached.c.version_id)
        .join(n, n.c.path == v.c.node_path)
        .order_by(v.c.node_path, v.c.created_at)
    )


def _flag_seed(where):
    """(flag, version) for the versions the selected flags name directly: the flagged version itself, or every
    version trained on the flagged dataset (as data or replay). One SELECT: a recursive CTE's anchor must be one."""
    f, vd, v = Flag.__table__, VersionDataset.__table__, Version.__table__
    trained_on = exists().where(vd.c.version_id == v.c.id, vd.c.dataset_id == f.c.target_id)
    names = or_(and_(f.c.target_kind == literal("version"), v.c.id == f.c.target_id),
                and_(f.c.target_kind == literal("dataset"), trained_on))
    return (select(f.c.id.label("flag_id"), v.c.id.label("version_id"), literal(1).label("direct"))
            .select_from(f).join(v, names).where(where))


def _collect(rows) -> list[Affected]:
    by_version: dict[str, list] = {}
    flag_ids: dict[str, set[int]] = defaultdict(set)
    direct: dict[str, set[int]] = defaultdict(set)
    for flag_id, vid, node, relation, cur, is_direct in rows:
        by_version.setdefault(vid, [node, relation, bool(cur)])
        flag_ids[vid].add(flag_id)
        if is_direct:
            direct[vid].add(flag_id)
    return [Affected(vid, node, rel, cur, tuple(sorted(flag_ids[vid])), tuple(sorted(direct[vid])))
            for vid, (node, rel, cur) in by_version.items()]


def impact(ws: Workspace, ref: str) -> tuple[Target, list[Affected]]:
    """Every version (and so node) derived from a dataset or version, flagged or not: one recursive query."""
    target = resolve_target(ws, ref)
    vd, v = VersionDataset.__table__, Version.__table__
    if target.kind == "dataset":
        seed = select(literal(0).label("flag_id"), vd.c.version_id.label("version_id"),
                      literal(1).label("direct")).where(vd.c.dataset_id == target.id)
    else:
        seed = select(literal(0).label("flag_id"), v.c.id.label("version_id"),
                      literal(1).label("direct")).where(v.c.id == target.id)
    with ws.db.session() as s:
        rows = s.execute(_reach(seed)).all()
    return target, _collect(rows)


def affected(ws: Workspace) -> dict[str, list[FlagInfo]]:
    """Version id -> the active flags that reach it (one query for the whole registry)."""
    return {vid: list(r.flags) for vid, r in reach(ws).items()}


def reach(ws: Workspace) -> dict[str, Reach]:
    """Version id -> the active flags that reach it and the ones naming it directly (one recursive query, plus
    one read of the active flags when there are any)."""
    with ws.db.session() as s:
        f = Flag.__table__
        rows = s.execute(_reach(_flag_seed(f.c.cleared_at.is_(None)))).all()
        if not rows:
            return {}
        active = list(s.scalars(select(Flag).where(Flag.cleared_at.is_(None))))
        names = _target_names(s, active)
        infos = {r.id: _info(r, names[r.id]) for r in active}
    # A flag cleared between the two reads reaches nothing any more: left out, not an error.
    out = {}
    for a in _collect(rows):
        found = tuple(infos[i] for i in a.flag_ids if i in infos)
        if found:
            out[a.version_id] = Reach(found, tuple(i for i in a.direct if i in infos))
    return out


def flags_reaching(ws: Workspace, version_id: str) -> list[FlagInfo]:
    """The active flags that reach one version (empty when it is clean)."""
    return affected(ws).get(version_id, [])


def _target_names(s, rows) -> dict[int, str]:
    out = {}
    for r in rows:
        if r.target_kind == "dataset":
            ds = s.get(Dataset, r.target_id)
            out[r.id] = f"{ds.name}@{ds.seq} ({r.target_id[:12]})" if ds else r.target_id[:12]
        else:
            v = s.get(Version, r.target_id)
            out[r.id] = f"{v.node_path}@{r.target_id[:12]}" if v else r.target_id[:12]
    return out


def _info(r: Flag, name: str) -> FlagInfo:
    return FlagInfo(r.id, r.target_kind, r.target_id, name, r.severity, r.reason, r.created_by, r.created_at,
                    r.cleared_at, r.cleared_by, r.cleared_reason)
