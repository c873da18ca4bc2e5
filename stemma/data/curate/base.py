"""What a curation step is: a registered name, a documented config dataclass, and one method to implement.

Two kinds of step, in the manner of datatrove's pipeline blocks:

- `DocumentStep` looks at one document at a time (`apply`): keep it, change it (PII placeholders), tag it
  (language, scores) or drop it with a reason. The pipeline runs these in worker processes, one shard each.
- `CorpusStep` needs the whole corpus (deduplication, poisoning, decontamination): it computes a small
  `signature` per shard in the workers (hashes, MinHash bands), then `decide`s once over every shard's signature
  in the driver, returning the documents to drop or tag. The pipeline applies those decisions in the next pass.

Steps never read files or count their own in/out: the pipeline does that and fills a `StepStats` per shard,
merged into the datasheet. A step only reports *kinds* (``stats.count("email")``) and drops with a reason.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ...errors import SpecError
from ...plugins import Registry

EXAMPLES_PER_KIND = 3
"""Removed / modified examples kept per step (and per reason) in the datasheet."""
EXAMPLE_CHARS = 160
"""Characters of a document kept in an example."""


@dataclass
class Doc:
    """One document in flight. ``id`` and ``split`` are fixed when it is read and never change."""

    id: str
    """First 16 hex digits of the sha256 of the document as read (normalised, chunked)."""
    text: str
    split: str
    """``train`` or ``test``: decided by the id's hash, so stable when other documents come or go."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Everything else a JSONL line carried (``source``, ``license``...) plus what steps add (``language``, scores)."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "split": self.split, "text": self.text, **self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Doc:
        obj = dict(obj)
        return cls(id=obj.pop("id"), split=obj.pop("split"), text=obj.pop("text"), meta=obj)


@dataclass(frozen=True)
class Drop:
    """A step's decision to remove a document."""

    reason: str
    """Short kind of the reason (``gopher_mean_word_length``, ``near_duplicate``): counted in the datasheet."""
    evidence: str | None = None
    """What supports it (the kept duplicate's id, the matched n-gram): shown with the examples."""


@dataclass(frozen=True)
class Tag:
    """A corpus step's decision to keep a document but record something about it in its metadata."""

    meta: dict[str, Any]
    kind: str
    """Counted in the datasheet like a drop reason."""
    evidence: str | None = None


@dataclass
class StepStats:
    """What one step did to the documents of one shard (or, merged, of the whole corpus)."""

    step: str
    docs_in: int = 0
    kept: int = 0
    removed: int = 0
    modified: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    """Per-kind counts: PII kinds, drop reasons, languages, licences, tags."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """A few removed / modified / flagged documents by id, with the reason and evidence."""
    totals: dict[str, float] = field(default_factory=dict)
    """Sums a step wants turned into corpus-level rates (e.g. ``hedge`` cue counts, ``words``)."""

    def count(self, kind: str, n: int = 1) -> None:
        self.kinds[kind] += n

    def add(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def example(self, action: str, doc: Doc, reason: str | None = None, evidence: str | None = None) -> None:
        same = [e for e in self.examples if e["action"] == action and e.get("reason") == reason]
        if len(same) < EXAMPLES_PER_KIND:
            item = {"action": action, "id": doc.id, "text": doc.text[:EXAMPLE_CHARS]}
            if reason:
                item["reason"] = reason
            if evidence:
                item["evidence"] = evidence[:EXAMPLE_CHARS]
            self.examples.append(item)

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.kept += other.kept
        self.removed += other.removed
        self.modified += other.modified
        self.bytes_in += other.bytes_in
        self.seconds += other.seconds
        self.kinds.update(other.kinds)
        for k, v in other.totals.items():
            self.add(k, v)
        for e in other.examples:
            same = [x for x in self.examples if x["action"] == e["action"] and x.get("reason") == e.get("reason")]
            if len(same) < EXAMPLES_PER_KIND:
                self.examples.append(e)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "docs_in": self.docs_in, "kept": self.kept, "removed": self.removed,
                "modified": self.modified, "bytes_in": self.bytes_in, "seconds": round(self.seconds, 4),
                "kinds": dict(sorted(self.kinds.items())), "totals": dict(sorted(self.totals.items())),
                "examples": self.examples}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StepStats:
        return cls(step=obj["step"], docs_in=obj["docs_in"], kept=obj["kept"], removed=obj["removed"],
                   modified=obj["modified"], bytes_in=obj["bytes_in"], seconds=obj["seconds"],
                   kinds=Counter(obj["kinds"]), examples=list(obj["examples"]), totals=dict(obj.get("totals", {})))


@dataclass(frozen=True)
class CurateContext:
    """What a step may know about the dataset it curates (all part of the dataset's identity)."""

    name: str
    language: str | None = None
    """The dataset's declared language (``en``, ``multi``, or None)."""
    license: str | None = None
    """The dataset's declared licence (an SPDX expression), or None."""
    domain: str | None = None
    references: tuple[str, ...] = ()
    """Paths of canonical JSONL files whose documents are evaluation data for this dataset: the test splits of
    every dataset in the tree (and evaluation task files). Leakage and decontamination steps read them."""


class Step:
    """Base of every curation step. Subclasses set ``name``, ``config_cls`` and implement one method."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    version: ClassVar[int] = 1
    """Bumped when a step's behaviour changes, so datasets curated by the old behaviour get a new identity."""

    def __init__(self, config: Any, ctx: CurateContext):
        self.config = config
        self.ctx = ctx

    def setup(self) -> None:
        """Load what the step needs (a model, a lexicon) once per worker process; called before the first shard."""

    def identity(self) -> dict[str, Any]:
        """What enters the dataset's identity for this step."""
        return {"step": self.name, "version": self.version, "config": dataclasses.asdict(self.config)}


class DocumentStep(Step):
    """A step that decides on each document alone."""

    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        """Return the document (changed in place or not) or a `Drop`. Count kinds on ``stats``."""
        raise NotImplementedError


class CorpusStep(Step):
    """A step that needs every document: a signature per shard (workers), one decision over all (driver)."""

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        """Small arrays describing ``docs`` (in order), e.g. ``{"hash": uint64[n]}``; stored per shard as ``.npz``."""
        raise NotImplementedError

    def decide(self, ids: list[np.ndarray], splits: list[np.ndarray], signatures: Iterator[dict[str, np.ndarray]],
               stats: StepStats) -> dict[tuple[int, int], Drop | Tag]:
        """Decide over the whole corpus, shard by shard in order.

        ``ids[i]`` (str array) and ``splits[i]`` (bool array, True = test) are shard i's document ids and splits,
        ``signatures`` yields shard i's signature arrays in the same order (read lazily, so memory stays bounded by
        what the step keeps). Returns the documents to drop or tag by position ``(shard, row)`` (ids are not unique:
        exact copies share one); every other document is kept as it is. Count kinds on ``stats`` (the pipeline counts
        in / kept / removed and records examples)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ the registry
_STEPS: Registry[type[Step]] = Registry("curation step", lambda cls: cls.name, SpecError)
register, get, names = _STEPS.register, _STEPS.get, _STEPS.names


@dataclass(frozen=True)
class StepSpec:
    """One entry of a ``curate:`` list: a step name and its validated config."""

    name: str
    config: Any

    def identity(self) -> dict[str, Any]:
        cls = get(self.name)
        return {"step": self.name, "version": cls.version, "config": dataclasses.asdict(self.config)}

    def build(self, ctx: CurateContext) -> Step:
        return get(self.name)(self.config, ctx)


def parse_steps(raw: Any, where: str) -> tuple[StepSpec, ...]:
    """A ``curate:`` list from YAML or a ``--curate`` file: each item a step name or ``{name: {config}}``."""
    from ...configs import parse_dataclass
    from . import steps  # noqa: F401 - registers the built-in steps

    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError(f"{where}: curate must be a list of steps (a name, or {{name: {{config}}}})")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, cfg = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, cfg = next(iter(item.items()))
            cfg = cfg or {}
        else:
            raise SpecError(f"{where}: curate[{i}]: expected a step name or a one-key mapping {{name: {{config}}}}")
        cls = get(str(name))
        config = parse_dataclass(cls.config_cls, cfg, f"{where}: curate[{i}] ({name})")
        check = getattr(config, "check", None)
        if check is not None:
            try:
                check()
            except ValueError as e:
                raise SpecError(f"{where}: curate[{i}] ({name}): {e}") from None
        out.append(StepSpec(name=str(name), config=config))
    return tuple(out)
