"""Run a curation over a corpus in shards: streamed, resumable, on local processes or on Ray.

What runs is the step list; where it runs is the executor (datatrove's split of pipeline and executor).

```
inputs ──read (driver, streaming)──▶ read/shard-00000.jsonl ...        each doc: id, split (by hash), text, meta
   pass 0: [document steps ...] [+ signature of corpus step 1]  ──▶ pass0/shard-i.jsonl, .stats.json, .sig.npz
   decide corpus step 1 over every shard's signature (driver)  ──▶ pass0/decisions-i.json
   pass 1: apply decisions of step 1, [document steps ...] [+ signature of corpus step 2] ...
   finalise: stream the last pass's shards into train.jsonl / test.jsonl (hashed as written) + the datasheet
```

Every file a pass writes is written atomically and a shard is finished when its ``.done`` marker exists, so a run
killed at any point (``kill -9``) resumes from the last finished shard of the pass it was in, and produces
byte-identical outputs: the dataset id does not depend on interruptions, the executor, or the number of workers.
Memory is bounded by one shard in a worker and by what a corpus step keeps from the signatures in the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ...errors import DataError
from ...store import atomic_write_bytes, canonical_json
from ..options import IngestOptions
from ..read import FileReport, ReadOptions, doc_id, is_test, read_documents
from .base import CorpusStep, CurateContext, Doc, Drop, StepSpec, StepStats, Tag

DEFAULT_SHARD_BYTES = 8 << 20
"""Text per shard: small enough that a worker holds one comfortably, large enough to amortise a task."""
RELEASE_BYTES = 64 << 20
"""From this much text read, the local workers are ended before each corpus step's decision and started again for
the next pass: the decision runs in the driver alone and its memory grows with the corpus, while idle workers would
keep what the last pass's models and shards took (their allocators seldom give it back). Below it, restarting the
workers would cost more time than the memory is worth."""


def _line(obj: dict[str, Any]) -> bytes:
    """One document as a canonical JSONL line (sorted keys, compact, UTF-8). orjson does this about ten times faster
    than the json module, which matters when every pass writes every document; it refuses integers past 64 bits,
    which the json module then writes."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return canonical_json(obj) + b"\n"


def _write(path: Path, data: bytes) -> None:
    """Write a work file atomically (rename), without fsync: work files must survive a killed process, which a rename
    guarantees; after a machine crash, delete ``work/curate`` and run again."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Pass:
    """One pass over every shard: decisions of the previous corpus step, then document steps, then a signature."""

    index: int
    apply: StepSpec | None
    """The corpus step whose decisions this pass applies."""
    steps: tuple[StepSpec, ...]
    """Document steps, in order."""
    signature: StepSpec | None
    """The corpus step whose signature this pass computes (decided after the pass)."""


def plan_passes(steps: tuple[StepSpec, ...]) -> list[Pass]:
    from .base import get

    passes: list[Pass] = []
    apply: StepSpec | None = None
    doc_steps: list[StepSpec] = []
    for s in steps:
        if issubclass(get(s.name), CorpusStep):
            passes.append(Pass(len(passes), apply, tuple(doc_steps), s))
            apply, doc_steps = s, []
        else:
            doc_steps.append(s)
    passes.append(Pass(len(passes), apply, tuple(doc_steps), None))
    return passes


# ------------------------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to run one pass over one shard (picklable, no open handles)."""

    pass_: Pass
    ctx: CurateContext
    src: str
    dst: str
    """Path prefix of the outputs: ``dst.jsonl``, ``dst.stats.json``, ``dst.sig.npz``, ``dst.done``."""
    decisions: str | None


_STEP_CACHE: dict[str, Any] = {}


def _step(spec: StepSpec, ctx: CurateContext):
    """One instance per step, config and dataset in each worker process, set up once (models load once)."""
    key = _step_key(spec, ctx)
    inst = _STEP_CACHE.get(key)
    if inst is None:
        from . import steps  # noqa: F401 - a fresh worker process registers the built-in steps here
        inst = spec.build(ctx)
        inst.setup()
        _STEP_CACHE[key] = inst
    return inst


def _step_key(spec: StepSpec, ctx: CurateContext) -> str:
    return canonical_json([spec.identity(), dataclasses.asdict(ctx)]).decode()


def _import_steps() -> None:
    from . import steps  # noqa: F401 - registers the built-in steps


def _evict_except(keep: list[StepSpec], ctx: CurateContext) -> None:
    """A worker keeps only the current pass's steps: a language model loaded in pass 0 is not held through pass 4."""
    wanted = {_step_key(spec, ctx) for spec in keep}
    for key in [k for k in _STEP_CACHE if k not in wanted]:
        del _STEP_CACHE[key]


def _read_shard(path: str) -> Iterator[Doc]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield Doc.from_json(orjson.loads(line))


def run_shard(task: ShardTask) -> str:
    """Run one pass over one shard and write its outputs atomically; a finished shard is skipped."""
    done = Path(task.dst + ".done")
    if done.exists():
        return task.dst
    p = task.pass_
    decisions: dict[int, dict] = {}
    if task.decisions and Path(task.decisions).exists():
        decisions = {int(k): v for k, v in json.loads(Path(task.decisions).read_text()).items()}
    applied = StepStats(step=p.apply.name) if p.apply else None
    _evict_except([*p.steps, *([p.signature] if p.signature else [])], task.ctx)
    steps = [_step(s, task.ctx) for s in p.steps]
    stats = [StepStats(step=s.name) for s in p.steps]
    kept: list[Doc] = []  # only for a signature: the documents are otherwise held once, as output lines
    out_lines: list[bytes] = []
    for row, doc in enumerate(_read_shard(task.src)):
        size = len(doc.text.encode())
        if applied is not None:
            applied.docs_in += 1
            applied.bytes_in += size
            d = decisions.get(row)
            if d is not None and d["action"] == "drop":
                applied.removed += 1
                applied.count(d["reason"])
                applied.example("removed", doc, d["reason"], d.get("evidence"))
                continue
            if d is not None:  # tag
                doc.meta.update(d["meta"])
                applied.count(d["reason"])
                applied.example("flagged", doc, d["reason"], d.get("evidence"))
            applied.kept += 1
        result: Doc | Drop = doc
        for step, st in zip(steps, stats):
            st.docs_in += 1
            st.bytes_in += size
            before = doc.text
            t0 = time.perf_counter()
            result = step.apply(doc, st)
            st.seconds += time.perf_counter() - t0
            if isinstance(result, Drop):
                st.removed += 1
                st.count(result.reason)
                st.example("removed", doc, result.reason, result.evidence)
                break
            st.kept += 1
            if result.text != before:
                st.modified += 1
                st.example("modified", result, None, before[:160])
                size = len(result.text.encode())
            doc = result
        if isinstance(result, Drop):
            continue
        if p.signature is not None:
            kept.append(doc)
        out_lines.append(_line(doc.to_json()))
    if applied is not None:
        stats.insert(0, applied)
    if p.signature is not None:
        sig_step = _step(p.signature, task.ctx)
        t0 = time.perf_counter()
        sig = sig_step.signature(kept)
        sig_stats = StepStats(step=p.signature.name, seconds=time.perf_counter() - t0)
        arrays = {f"sig_{k}": np.asarray(v) for k, v in sig.items()}
        arrays["ids"] = np.asarray([d.id for d in kept], dtype="U16")
        arrays["test"] = np.asarray([d.split == "test" for d in kept], dtype=bool)
        tmp = Path(task.dst + ".sig.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, task.dst + ".sig.npz")
        stats.append(sig_stats)
    _write(Path(task.dst + ".jsonl"), b"".join(out_lines))
    _write(Path(task.dst + ".stats.json"), canonical_json([s.to_json() for s in stats]))
    _write(done, b"")
    return task.dst


# ------------------------------------------------------------------------------------------------ executors
def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when its driver is gone. A driver killed by a signal it cannot clean up
    after (SIGTERM, SIGKILL) would otherwise leave its warm workers waiting forever, each holding its imports."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="stemma-parent-watch", daemon=True).start()


def _worker_pid(_: object) -> int:
    """The pid of the worker that ran it (for tests of the pool)."""
    return os.getpid()


class LocalExecutor:
    """Shards on this machine's cores, one process each (the GIL would serialise threads on Python steps)."""

    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool = None

    def warm(self) -> None:
        """Start the worker processes and their imports now, without waiting: a spawned worker takes about half a
        second to start, which overlaps the driver's sequential read instead of following it."""
        if self.workers > 1 and self._pool is None:
            for _ in range(self.workers):
                self._get_pool().submit(_import_steps)

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the driver may hold torch's thread pools and open database connections.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_exit_with_parent, initargs=(os.getpid(),))
        return self._pool

    def map(self, fn: Callable, tasks: list) -> list:
        if self.workers == 1 or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        return list(self._get_pool().map(fn, tasks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def release(self) -> None:
        """End the worker processes until the next `map`, which starts them again."""
        self.close()


class RayExecutor:
    """Shards as Ray tasks, for corpora that need a cluster (``ray.init(address)``; local when no address)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise DataError("--executor ray needs the package ray: pip install 'stemma[ray]'") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kw["address"] = address
            elif workers:
                kw["num_cpus"] = workers
            ray.init(**kw)
            self._started = True
        self._remote = ray.remote(run_shard_remote)

    def map(self, fn: Callable, tasks: list) -> list:
        refs = [self._remote.remote(fn, t) for t in tasks]
        return self.ray.get(refs)

    def release(self) -> None:
        """Nothing to end: Ray schedules its workers itself."""

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def run_shard_remote(fn: Callable, task: Any) -> Any:
    return fn(task)


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None):
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address or os.environ.get("STEMMA_RAY_ADDRESS"), workers)
    raise DataError(f"unknown executor {kind!r} (local or ray)")


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class ReadResult:
    shards: list[str]
    files: list[dict[str, Any]]
    docs: int
    bytes: int
    test_path: str
    """Canonical JSONL of the documents in the test split as read: evaluation data for the tree's other datasets."""


@dataclass
class Curated:
    """The outputs of a curation: two canonical JSONL files and what to put in the manifest and datasheet."""

    train_path: Path
    test_path: Path
    train_sha256: str
    test_sha256: str
    counts: dict[str, Any]
    files: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    """Per step: identity and deterministic stats (in, kept, removed, modified, kinds, examples)."""
    run: dict[str, Any]
    """Seconds and MB/s per step, the executor: facts of this run, kept out of the dataset's identity."""
    licenses: dict[str, int] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)


def work_key(paths: list[Path], opts: IngestOptions, read: ReadOptions) -> str:
    """Names a run's work directory: same inputs (by path, size, mtime) and options resume the same run."""
    files = []
    for p in paths:
        p = Path(p).absolute()
        items = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in items:
            st = f.stat()
            files.append([str(f), st.st_size, st.st_mtime_ns])
    ident = {"files": files, "opts": _opts_identity(opts), "read": dataclasses.asdict(read)}
    return hashlib.sha256(canonical_json(ident)).hexdigest()[:24]


def _opts_identity(opts: IngestOptions) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("steps", "strict")}
    d["steps"] = [s.identity() for s in opts.steps]
    return d


class Curation:
    """One corpus through its steps, in ``work_dir`` (resumable). `read` first, then `run` with the references."""

    def __init__(self, paths: list[Path], opts: IngestOptions, work_dir: Path, executor=None,
                 read_opts: ReadOptions | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES, reporter=None):
        from ...progress import NullReporter

        if not 0.0 < opts.test_fraction < 0.5:
            raise DataError(f"test_fraction must be in (0, 0.5), got {opts.test_fraction}")
        self.paths = [Path(p) for p in paths]
        self.opts = opts
        self.steps = opts.steps or _default_steps()
        self.work = Path(work_dir)
        self.executor = executor or LocalExecutor(1)
        self.read_opts = read_opts or ReadOptions(max_doc_chars=opts.max_doc_chars, strict=opts.strict)
        self.shard_bytes = shard_bytes
        self.reporter = reporter or NullReporter()

    # -------------------------------------------------------------------------------- read
    def read(self) -> ReadResult:
        """Stream the inputs into shards of documents with their ids and splits (once; a finished read is kept)."""
        done = self.work / "read" / "done.json"
        if done.exists():
            r = json.loads(done.read_text())
            return ReadResult(**r)
        rdir = self.work / "read"
        if rdir.exists():
            shutil.rmtree(rdir)  # an interrupted read starts over: it is one sequential pass
        rdir.mkdir(parents=True)
        reports: list[FileReport] = []
        shards: list[str] = []
        n = total = 0
        cur, cur_bytes = None, 0
        test_f = open(rdir / "test-as-read.jsonl", "wb")
        first_train: tuple[str, int, int] | None = None  # (id, shard, row) of the smallest training id
        last_test: tuple[str, int, int] | None = None
        n_test = 0
        row = 0
        try:
            for text, meta in read_documents(self.paths, self.read_opts, reports):
                if cur is None or cur_bytes >= self.shard_bytes:
                    if cur is not None:
                        cur.close()
                    path = rdir / f"shard-{len(shards):05d}.jsonl"
                    shards.append(str(path))
                    cur, cur_bytes, row = open(path, "wb"), 0, 0
                if self.opts.license and "license" not in meta:
                    meta = {**meta, "license": self.opts.license}
                ident, full = doc_id(text)
                split = "test" if is_test(full, self.opts.test_fraction) else "train"
                line = _line(Doc(ident, text, split, meta).to_json())
                cur.write(line)
                cur_bytes += len(line)
                total += len(text.encode())
                if split == "test":
                    n_test += 1
                    test_f.write(_line({"id": ident, "text": text}))
                    if last_test is None or ident > last_test[0]:
                        last_test = (ident, len(shards) - 1, row)
                elif first_train is None or ident < first_train[0]:
                    first_train = (ident, len(shards) - 1, row)
                n += 1
                row += 1
        finally:
            if cur is not None:
                cur.close()
            test_f.close()
        files = [r.to_json() for r in reports]
        if n == 0:
            raise DataError(f"corpus {', '.join(map(str, self.paths))} is empty: no non-blank documents"
                            + _problems_suffix(files))
        if n < 2:
            raise DataError("corpus has a single document after chunking; need at least 2 to hold out a test split")
        # Tiny corpora: make sure both splits hold something (the extreme ids move, deterministically).
        if n_test == 0 and first_train is not None:
            self._move_split(shards[first_train[1]], first_train[2], "test", rdir / "test-as-read.jsonl")
        elif n_test == n and last_test is not None:
            self._move_split(shards[last_test[1]], last_test[2], "train", rdir / "test-as-read.jsonl")
        result = ReadResult(shards=shards, files=files, docs=n, bytes=total, test_path=str(rdir / "test-as-read.jsonl"))
        atomic_write_bytes(done, canonical_json(dataclasses.asdict(result)))
        return result

    @staticmethod
    def _move_split(shard: str, row: int, split: str, test_path: Path) -> None:
        lines = Path(shard).read_bytes().splitlines(keepends=True)
        obj = json.loads(lines[row])
        obj["split"] = split
        lines[row] = _line(obj)
        atomic_write_bytes(Path(shard), b"".join(lines))
        tests = []
        for d in map(json.loads, Path(shard).read_text().splitlines()):
            if d["split"] == "test":
                tests.append(_line({"id": d["id"], "text": d["text"]}))
        if split == "test":
            atomic_write_bytes(test_path, b"".join(tests))
        else:
            kept = [ln for ln in test_path.read_bytes().splitlines(keepends=True) if json.loads(ln)["id"] != obj["id"]]
            atomic_write_bytes(test_path, b"".join(kept))

    # -------------------------------------------------------------------------------- run
    def run(self, references: tuple[str, ...] = ()) -> Curated:
        """Every pass over every shard, then the final split files. ``references``: evaluation data (JSONL paths)."""
        if hasattr(self.executor, "warm"):
            self.executor.warm()
        rr = self.read()
        # References in the order of their contents' hashes: their paths (work directories keyed by file times)
        # differ between machines and clones, and the dataset's identity must not.
        by_hash = sorted((hashlib.sha256(Path(r).read_bytes()).hexdigest(), str(r)) for r in set(references))
        ref_hashes = [h for h, _ in by_hash]
        ctx = CurateContext(name=self.opts.name, language=self.opts.language, license=self.opts.license,
                            domain=self.opts.domain, references=tuple(r for _, r in by_hash))
        passes = plan_passes(self.steps)
        shards = rr.shards
        keys, prev = [], hashlib.sha256(canonical_json(ref_hashes)).hexdigest()
        for p in passes:  # a pass is named by everything that decides its outputs, its input pass included
            prev = _pass_key(p, ctx, prev)
            keys.append(prev)
        step_stats: dict[str, StepStats] = {}
        order: list[str] = []
        for p in passes:
            pdir = self.work / f"pass{p.index}-{keys[p.index]}"
            pdir.mkdir(parents=True, exist_ok=True)
            prev_dir = self.work / f"pass{p.index - 1}-{keys[p.index - 1]}" if p.index else None
            tasks = [ShardTask(pass_=p, ctx=ctx, src=src, dst=str(pdir / f"shard-{i:05d}"),
                               decisions=str(prev_dir / f"decisions-{i:05d}.json") if prev_dir and p.apply else None)
                     for i, src in enumerate(shards)]
            todo = [t for t in tasks if not Path(t.dst + ".done").exists()]
            label = " + ".join([s.name for s in p.steps] + ([p.signature.name] if p.signature else [])) or "apply"
            self.reporter.log(f"curate {self.opts.name}: pass {p.index} ({label}), {len(todo)} of {len(tasks)} "
                              f"shards to run on {self.executor.name}")
            self.executor.map(run_shard, todo)
            for t in tasks:
                for st in json.loads(Path(t.dst + ".stats.json").read_text()):
                    s = StepStats.from_json(st)
                    if s.step not in step_stats:
                        step_stats[s.step] = StepStats(step=s.step)
                        order.append(s.step)
                    step_stats[s.step].merge(s)
            if p.signature is not None:
                if rr.bytes >= RELEASE_BYTES and not (pdir / "decided.json").exists():
                    self.executor.release()
                self._decide(p, ctx, tasks, pdir, step_stats[p.signature.name])
            shards = [t.dst + ".jsonl" for t in tasks]
        return self._finalise(rr, shards, [step_stats[n] for n in order], ref_hashes)

    def _decide(self, p: Pass, ctx: CurateContext, tasks: list[ShardTask], pdir: Path, stats: StepStats) -> None:
        done = pdir / "decided.json"
        if done.exists():
            saved = StepStats.from_json(json.loads(done.read_text()))
            stats.kinds.update(saved.kinds)
            stats.seconds += saved.seconds
            stats.totals.update(saved.totals)
            return
        step = _step(p.signature, ctx)
        ids, splits = [], []
        for t in tasks:
            with np.load(t.dst + ".sig.npz", allow_pickle=False) as z:
                ids.append(z["ids"])
                splits.append(z["test"])

        def sigs() -> Iterator[dict[str, np.ndarray]]:
            for t in tasks:
                with np.load(t.dst + ".sig.npz", allow_pickle=False) as z:
                    yield {k[4:]: z[k] for k in z.files if k.startswith("sig_")}

        own = StepStats(step=p.signature.name)
        t0 = time.perf_counter()
        decisions = step.decide(ids, splits, sigs(), own)
        own.seconds = time.perf_counter() - t0
        per_shard: dict[int, dict[int, dict]] = {}
        for (s, r), d in decisions.items():
            if isinstance(d, Drop):
                item = {"action": "drop", "reason": d.reason, "evidence": d.evidence}
            elif isinstance(d, Tag):
                item = {"action": "tag", "reason": d.kind, "evidence": d.evidence, "meta": d.meta}
            else:
                raise TypeError(f"step {p.signature.name} decided {d!r}; expected Drop or Tag")
            per_shard.setdefault(int(s), {})[int(r)] = item
        for i, _ in enumerate(tasks):
            path = pdir / f"decisions-{i:05d}.json"
            atomic_write_bytes(path, canonical_json({str(r): v for r, v in sorted(per_shard.get(i, {}).items())}))
        # What decide counted (e.g. clusters) joins the counts the next pass makes while applying the decisions.
        atomic_write_bytes(done, canonical_json(own.to_json()))
        stats.kinds.update(own.kinds)
        stats.seconds += own.seconds
        stats.totals.update(own.totals)

    def _finalise(self, rr: ReadResult, shards: list[str], stats: list[StepStats], ref_hashes: list[str]) -> Curated:
        out = self.work / "out"
        out.mkdir(exist_ok=True)
        train_p, test_p = out / "train.jsonl", out / "test.jsonl"
        th, eh = hashlib.sha256(), hashlib.sha256()
        counts = {"train_documents": 0, "test_documents": 0, "characters": 0, "whitespace_tokens": 0, "bytes": 0}
        licenses: dict[str, int] = {}
        with open(str(train_p) + ".tmp", "wb") as tf, open(str(test_p) + ".tmp", "wb") as ef:
            for shard in shards:
                for doc in _read_shard(shard):
                    line = _line({"id": doc.id, "text": doc.text, **doc.meta})
                    if doc.split == "test":
                        ef.write(line)
                        eh.update(line)
                        counts["test_documents"] += 1
                    else:
                        tf.write(line)
                        th.update(line)
                        counts["train_documents"] += 1
                    counts["characters"] += len(doc.text)
                    counts["whitespace_tokens"] += len(doc.text.split())
                    counts["bytes"] += len(line)
                    lic = str(doc.meta.get("license") or "unknown")
                    licenses[lic] = licenses.get(lic, 0) + 1
        os.replace(str(train_p) + ".tmp", train_p)
        os.replace(str(test_p) + ".tmp", test_p)
        counts["documents"] = counts["train_documents"] + counts["test_documents"]
        counts["documents_read"] = rr.docs
        if counts["train_documents"] == 0 or counts["test_documents"] == 0:
            empty = "training" if counts["train_documents"] == 0 else "test"
            removed = ", ".join(f"{st.step} removed {st.removed}" for st in stats if st.removed) or "nothing removed"
            raise DataError(f"dataset {self.opts.name}: curation left the {empty} split empty "
                            f"({rr.docs} documents read; {removed})")
        by_name = {s.name: s for s in self.steps}
        step_rows, run_rows = [], []
        for st in stats:
            j = st.to_json()
            seconds = j.pop("seconds")
            spec = by_name.get(st.step)
            step_rows.append({**(spec.identity() if spec else {"step": st.step}), **j})
            run_rows.append({"step": st.step, "seconds": round(seconds, 3),
                             "mb_s": round(st.bytes_in / 1e6 / seconds, 2) if seconds > 0 else None})
        run = {"executor": self.executor.name, "workers": getattr(self.executor, "workers", None),
               "steps": run_rows, "mb_read": round(rr.bytes / 1e6, 3)}
        return Curated(train_path=train_p, test_path=test_p, train_sha256=th.hexdigest(), test_sha256=eh.hexdigest(),
                       counts=counts, files=rr.files, steps=step_rows, run=run, licenses=dict(sorted(licenses.items())),
                       references=ref_hashes)


def _pass_key(p: Pass, ctx: CurateContext, prev: str) -> str:
    ident = {"prev": prev, "apply": p.apply.identity() if p.apply else None, "steps": [s.identity() for s in p.steps],
             "signature": p.signature.identity() if p.signature else None,
             "ctx": {k: v for k, v in dataclasses.asdict(ctx).items() if k != "references"}}
    return hashlib.sha256(canonical_json(ident)).hexdigest()[:12]


def _default_steps() -> tuple[StepSpec, ...]:
    from .base import parse_steps

    return parse_steps(["exact_dedup"], "default curation")


def _problems_suffix(files: list[dict[str, Any]]) -> str:
    bad = [f for f in files if f.get("reason")]
    if not bad:
        return ""
    return " (" + "; ".join(f"{f['file']}: {f['reason']}" for f in bad[:3]) + ")"

