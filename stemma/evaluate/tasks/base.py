"""Evaluation tasks: the task base class, the registry of task kinds, and a task as declared in stemma.yaml.

A task kind is a class registered under a name (``generation``, ``choice``, ...) with a frozen dataclass config
documented field by field, the fields every row of its task file must have, and the metrics it reports, each with
its direction. A task declared in a suite is a `TaskSpec`: id, kind, validated config and the rows of its JSONL
file, read and checked at spec time. Its `TaskSpec.definition` (kind, config, rows) is what the task *is*: stored
as a blob when the tree is built, and its digest keys the memoised scores, so a changed file or config is a new
task, measured again. A kind only does the arithmetic of its metric; the model work goes through a
`stemma.evaluate.runner.Runner` (batched greedy generation and log-likelihoods of one version).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import SpecError
from ...plugins import Registry
from ...store import canonical_json, sha256_bytes

if TYPE_CHECKING:
    from ..runner import Runner

_KINDS: Registry[type[Task]] = Registry("task kind", lambda cls: cls.kind, SpecError)
register, get, names = _KINDS.register, _KINDS.get, _KINDS.names
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")
"""Task ids: short, so that ``task:<id>/<metric>`` fits the registry's metric names (64 characters)."""
SCHEMA = 1


def all_metrics() -> dict[str, bool]:
    """Every metric any kind reports -> higher is better (a name means the same thing in every kind)."""
    out: dict[str, bool] = {}
    for cls in _KINDS:
        out.update(cls.metrics)
    return out


@dataclass(frozen=True)
class TaskConfig:
    """Fields every kind that reads a task file has."""

    path: str = ""
    """The task file: JSONL, one row per line, relative to stemma.yaml. Only its content counts (a moved file with
    the same rows is the same task)."""
    limit: int = 64
    """Rows used at most, the first ones: tasks run on every node a build evaluates, so they should stay cheap."""


@dataclass(frozen=True)
class GenerateConfig(TaskConfig):
    """Fields of the kinds that generate continuations (greedy, deterministic)."""

    max_new_tokens: int = 32
    """New tokens per prompt at most; a prompt longer than the context minus these keeps its last tokens."""
    stop: tuple[str, ...] = ("\n",)
    """Generation stops before the first of these strings (and at the end-of-text token)."""


@dataclass(frozen=True)
class Result:
    """What scoring a task gives: its metrics (every name in the kind's ``metrics``) and details to keep with them."""

    metrics: dict[str, float]
    details: dict[str, Any]


class Task:
    """A task kind. Subclasses set the class variables, and implement `score` (and `examples` for the harness).

    An instance holds one task's validated config and rows; `score` asks a runner for generations or
    log-likelihoods in one batched call where it can, and turns them into the metrics.
    """

    kind: ClassVar[str]
    config_cls: ClassVar[type] = TaskConfig
    fields: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    """Fields every row of the task file must have, with their JSON types."""
    optional: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    """Fields a row may have (kept in the definition); any other field of a row is ignored."""
    metrics: ClassVar[dict[str, bool]] = {}
    """Metric name -> higher is better. The first one is the task's headline number."""
    prompt_field: ClassVar[str | None] = "prompt"
    """The row field a robustness task perturbs; None: the kind cannot be perturbed."""
    needs_file: ClassVar[bool] = True

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.config = spec.config
        self.rows: list[dict[str, Any]] = [dict(r) for r in spec.rows]

    # ------------------------------------------------------------------ spec time
    @classmethod
    def check_config(cls, cfg: Any) -> str | None:
        """A one-line problem with a validated config, or None."""
        return None

    @classmethod
    def check_row(cls, row: dict[str, Any]) -> str | None:
        """A one-line problem with one row (its fields are present and typed), or None."""
        return None

    @property
    def max_new_tokens(self) -> int:
        """New tokens the task generates per prompt (0: log-likelihoods only)."""
        return int(getattr(self.config, "max_new_tokens", 0))

    def texts(self) -> list[str]:
        """Every string the task feeds to or compares with the model: the tokenizer must give them back unchanged."""
        out: list[str] = []
        for r in self.rows:
            for v in r.values():
                if isinstance(v, str):
                    out.append(v)
                elif isinstance(v, list):
                    out.extend(x for x in v if isinstance(x, str))
                elif isinstance(v, dict):
                    out.extend(x for x in v.values() if isinstance(x, str))
        return out

    # ------------------------------------------------------------------ run time
    def score(self, runner: Runner) -> Result:
        raise NotImplementedError

    def examples(self) -> list[dict[str, Any]]:
        """What each row asks, in the form an external harness needs (prompt and reference, or choices)."""
        return [dict(r) for r in self.rows]

    def perturbed(self, fn) -> Task:
        """A copy of this task whose prompts went through ``fn(text, row_index) -> text`` (robustness)."""
        if self.prompt_field is None:
            raise TypeError(f"task kind {self.kind} has no prompts to perturb")
        rows = tuple({**r, self.prompt_field: fn(r[self.prompt_field], i)} for i, r in enumerate(self.rows))
        return type(self)(dataclasses.replace(self.spec, rows=rows))


def _typename(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


@dataclass(frozen=True)
class TaskSpec:
    """One task as declared in a suite: id, kind, validated config and rows (read from its file at spec time)."""

    id: str
    kind: str
    config: Any
    """The kind's config dataclass."""
    rows: tuple[dict[str, Any], ...]
    """The task file's rows (at most ``config.limit``), each with the fields the kind reads."""
    inner: TaskSpec | None = None
    """For a robustness task: the task whose prompts it perturbs."""

    @property
    def cls(self) -> type[Task]:
        return get(self.kind)

    @property
    def metrics(self) -> dict[str, bool]:
        return self.cls.metrics

    def task(self) -> Task:
        return self.cls(self)

    @functools.cached_property
    def definition(self) -> dict[str, Any]:
        """What the task is: kind, config (without the file's path) and rows; stored as a blob by `stemma build`."""
        cfg = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "path"}
        return {"kind": "task", "schema": SCHEMA, "id": self.id, "task_kind": self.kind, "config": cfg,
                "rows": [dict(r) for r in self.rows], "inner": self.inner.definition if self.inner else None}

    @functools.cached_property
    def digest(self) -> str:
        return sha256_bytes(canonical_json(self.definition))

    @property
    def key(self) -> str:
        """The memo key of its scores: the metric's ``split`` column (16 characters) holds it."""
        return self.digest[:16]

    def metric_name(self, metric: str) -> str:
        return f"task:{self.id}/{metric}"

    @staticmethod
    def from_definition(d: dict[str, Any]) -> TaskSpec:
        """The spec back from a stored definition (the registry path: no stemma.yaml needed)."""
        from ...configs import parse_dataclass

        cls = get(d["task_kind"])
        cfg = parse_dataclass(cls.config_cls, _from_json(cls.config_cls, d["config"]), f"task {d['id']}")
        inner = TaskSpec.from_definition(d["inner"]) if d.get("inner") else None
        return TaskSpec(id=d["id"], kind=d["task_kind"], config=cfg, rows=tuple(d["rows"]), inner=inner)


def _from_json(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """JSON gave lists where the config has tuples: pydantic takes either, so only unknown keys are dropped."""
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in known}


def validate_task_id(task_id: Any, where: str) -> str:
    if not isinstance(task_id, str) or not TASK_ID.match(task_id):
        raise SpecError(f"{where}: invalid task id {task_id!r}: use up to 40 lowercase letters, digits, '_', '-', '.'")
    return task_id


def read_rows(cls: type[Task], path: Path, limit: int, where: str) -> tuple[dict[str, Any], ...]:
    """The first ``limit`` rows of a JSONL task file, each checked for the kind's fields (one-line errors)."""
    if not path.is_file():
        raise SpecError(f"{where}: task file {path}: no such file")
    need = ", ".join(cls.fields)
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(rows) >= limit:
                break
            if not line.strip():
                continue
            at = f"{where}: task file {path.name} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecError(f"{at}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SpecError(f"{at}: expected a JSON object")
            for name, typ in cls.fields.items():
                if name not in row:
                    raise SpecError(f"{at}: missing field {name!r} (kind {cls.kind} needs {need})")
                if not isinstance(row[name], typ) or isinstance(row[name], bool) and bool not in _tuple(typ):
                    raise SpecError(f"{at}: field {name!r} must be {_typename(typ)}")
            for name, typ in cls.optional.items():
                if name in row and not isinstance(row[name], typ):
                    raise SpecError(f"{at}: field {name!r} must be {_typename(typ)}")
            problem = cls.check_row(row)
            if problem:
                raise SpecError(f"{at}: {problem}")
            rows.append({k: row[k] for k in (*cls.fields, *cls.optional) if k in row})
    if not rows:
        raise SpecError(f"{where}: task file {path}: no rows")
    return tuple(rows)


def _tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def make_task_spec(task_id: str, kind: str, raw_config: dict[str, Any] | None, root_dir: Path, where: str,
                   inner: TaskSpec | None = None) -> TaskSpec:
    """A validated `TaskSpec`: kind known, config fields and types, the task file's rows (SpecError otherwise)."""
    from ...configs import parse_dataclass

    validate_task_id(task_id, where)
    cls = get(kind)
    cfg = parse_dataclass(cls.config_cls, raw_config, f"{where} (kind {kind})")
    if getattr(cfg, "limit", 1) < 1:
        raise SpecError(f"{where}: limit must be >= 1")
    if getattr(cfg, "max_new_tokens", 1) < 1:
        raise SpecError(f"{where}: max_new_tokens must be >= 1")
    if not all(getattr(cfg, "stop", ("x",))):
        raise SpecError(f"{where}: stop strings must not be empty")
    problem = cls.check_config(cfg)
    if problem:
        raise SpecError(f"{where}: {problem}")
    rows: tuple[dict[str, Any], ...] = ()
    if cls.needs_file:
        if not cfg.path:
            raise SpecError(f"{where}: kind {kind} needs config.path (its JSONL task file)")
        p = Path(cfg.path)
        rows = read_rows(cls, p if p.is_absolute() else (root_dir / p).resolve(), cfg.limit, where)
    return TaskSpec(id=task_id, kind=kind, config=cfg, rows=rows, inner=inner)
