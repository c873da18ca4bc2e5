"""The curation pipeline: steps as identity, shards, bad input per file, executors, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stemma.data.curate import parse_steps, pipeline
from stemma.data.curate.pipeline import Curation, LocalExecutor, plan_passes
from stemma.data.ingest import IngestOptions, build_dataset, read_docs
from stemma.errors import DataError, SpecError

from ..conftest import CORPUS, write_subset


def _jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _corpus(tmp_path: Path, n: int = 60) -> Path:
    return write_subset(CORPUS / "en-manpages.jsonl", tmp_path / "c" / "en.jsonl", n, max_chars=2000)


def test_default_is_exact_dedup_and_copies_keep_one(tmp_path):
    docs = [{"text": f"document {i} " * 30} for i in range(30)] + [{"text": "document 3 " * 30}]
    built = build_dataset([_jsonl(tmp_path / "x.jsonl", docs)], IngestOptions(name="t"))
    (step,) = built.datasheet["curation"]
    assert step["step"] == "exact_dedup" and step["docs_in"] == 31 and step["removed"] == 1 and step["kept"] == 30
    assert step["kinds"] == {"exact_duplicate": 1}
    assert step["examples"][0]["evidence"].startswith("copy of ")
    texts = [d["text"] for d in read_docs(built.train) + read_docs(built.test)]
    assert len(texts) == len(set(texts)) == 30
    assert all(len(d["id"]) == 16 for d in read_docs(built.train))


def test_steps_are_part_of_the_identity(tmp_path):
    src = _corpus(tmp_path)
    a = build_dataset([src], IngestOptions(name="t", steps=parse_steps(["exact_dedup"], "t")))
    b = build_dataset([src], IngestOptions(name="t", steps=parse_steps(["exact_dedup"], "t")))
    c = build_dataset([src], IngestOptions(name="t", steps=parse_steps(["exact_dedup", "exact_dedup"], "t")))
    assert a.manifest == b.manifest
    assert c.manifest["train"] == a.manifest["train"]  # same content ...
    assert c.manifest != a.manifest  # ... but another curation: another dataset


def test_unknown_step_and_bad_config_are_one_line_errors():
    with pytest.raises(SpecError, match="unknown curation step 'nope'"):
        parse_steps(["nope"], "x.yaml")
    with pytest.raises(SpecError, match=r"curate\[0\]: expected a step name"):
        parse_steps([{"a": 1, "b": 2}], "x.yaml")
    with pytest.raises(SpecError, match="unknown config field"):
        parse_steps([{"exact_dedup": {"threshold": 0.3}}], "x.yaml")


def test_passes_group_document_steps_between_corpus_steps():
    passes = plan_passes(parse_steps(["exact_dedup"], "t"))
    assert [(p.apply, p.signature.name if p.signature else None) for p in passes][0] == (None, "exact_dedup")
    assert passes[1].apply.name == "exact_dedup" and passes[1].signature is None


def test_bad_input_is_reported_per_file_and_never_aborts(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _jsonl(d / "good.jsonl", [{"text": f"good document number {i} " * 10} for i in range(20)])
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02 binary")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n\nsecond paragraph".encode("latin-1"))
    (d / "mixed.jsonl").write_bytes(b'{"text": "fine line one two three"}\n{not json\n{"body": 1}\n'
                                    b'{"text": "bad \xff utf8"}\n{"text": "lone \\udcff surrogate"}\n'
                                    b'{"text": "another fine line"}\n')
    (d / "image.png").write_bytes(b"\x89PNG\r\n")
    with open(d / "huge.jsonl", "wb") as f:  # a single 100 MB line, never held whole
        f.write(b'{"text": "')
        block = b"x" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n{"text": "the line after the huge one survives"}\n')
    built = build_dataset([d], IngestOptions(name="t"))
    files = {f["file"]: f for f in built.datasheet["sources"]}
    assert files["good.jsonl"]["status"] == "ok" and files["good.jsonl"]["documents"] == 20
    assert files["empty.txt"] == {**files["empty.txt"], "status": "skipped", "reason": "empty file"}
    assert files["binary.txt"]["status"] == "skipped" and "binary" in files["binary.txt"]["reason"]
    assert files["latin1.txt"]["problems"] == {"not_utf8": 1}  # its one bad line; the rest is read
    assert files["mixed.jsonl"]["status"] == "partial" and files["mixed.jsonl"]["documents"] == 2
    assert files["mixed.jsonl"]["problems"] == {"bad_json": 1, "no_text": 1, "not_utf8": 1, "not_unicode": 1}
    assert any("line 2: not valid JSON" in e for e in files["mixed.jsonl"]["problem_examples"])
    assert files["image.png"]["status"] == "skipped" and "not a text or JSONL" in files["image.png"]["reason"]
    assert files["huge.jsonl"]["problems"] == {"line_too_long": 1} and files["huge.jsonl"]["documents"] == 1
    texts = {x["text"] for x in read_docs(built.train) + read_docs(built.test)}
    assert "the line after the huge one survives" in texts and "another fine line" in texts
    with pytest.raises(DataError, match=r"mixed.jsonl: line 2: not valid JSON"):
        build_dataset([d / "mixed.jsonl"], IngestOptions(name="t", strict=True))


def test_a_corpus_of_only_bad_input_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"empty: no non-blank documents \(e.txt: empty file\)"):
        build_dataset([tmp_path / "e.txt"], IngestOptions(name="t"))


def test_shards_and_processes_give_the_same_dataset(tmp_path):
    src = _corpus(tmp_path, 120)
    one = build_dataset([src], IngestOptions(name="t"))
    ex = LocalExecutor(2)
    try:
        cur = Curation([src], IngestOptions(name="t"), tmp_path / "w", executor=ex, shard_bytes=20_000)
        many = cur.run()
    finally:
        ex.close()
    assert len(cur.read().shards) > 5
    assert (many.train_sha256, many.test_sha256) == (one.manifest["train"], one.manifest["test"])
    assert many.steps == one.datasheet["curation"]


def test_workers_end_before_a_corpus_step_decides_on_a_large_corpus(tmp_path, monkeypatch):
    # A corpus step's decision runs in the driver alone: on a large corpus the idle workers are ended first (they
    # would hold the last pass's memory) and the next pass starts new ones; the dataset is the same.
    src = _corpus(tmp_path, 120)
    opts = IngestOptions(name="t", steps=parse_steps(["exact_dedup", "near_dedup"], "t"))
    one = build_dataset([src], opts)
    events = []

    class Watched(LocalExecutor):
        def map(self, fn, tasks):
            events.append("map")
            return super().map(fn, tasks)

        def release(self):
            events.append("release" if self._pool is not None else "release without workers")
            super().release()

    decide = Curation._decide

    def watched_decide(self, *args):
        events.append("decide alone" if self.executor._pool is None else "decide beside workers")
        return decide(self, *args)

    monkeypatch.setattr(pipeline, "RELEASE_BYTES", 0)
    monkeypatch.setattr(Curation, "_decide", watched_decide)
    ex = Watched(2)
    try:
        many = Curation([src], opts, tmp_path / "w", executor=ex, shard_bytes=20_000).run()
    finally:
        ex.close()
    assert events == ["map", "release", "decide alone"] * 2 + ["map"]
    assert (many.train_sha256, many.test_sha256) == (one.manifest["train"], one.manifest["test"])


SLOW_STEP = '''
import time
from dataclasses import dataclass
from stemma.data.curate.base import DocumentStep, register

@dataclass(frozen=True)
class SlowConfig:
    """Seconds to wait per document."""
    wait: float = 0.02

@register
class Slow(DocumentStep):
    name = "slow"
    config_cls = SlowConfig
    def apply(self, doc, stats):
        time.sleep(self.config.wait)
        doc.text = doc.text.upper()
        return doc
'''


def test_killed_run_resumes_from_finished_shards_with_the_same_id(tmp_path):
    (tmp_path / "slowstep.py").write_text(SLOW_STEP)
    src = _corpus(tmp_path, 120)
    work = tmp_path / "work"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import slowstep
        from stemma.data.curate import parse_steps
        from stemma.data.curate.pipeline import Curation
        from stemma.data.ingest import IngestOptions
        opts = IngestOptions(name="t", steps=parse_steps(["exact_dedup", "slow"], "t"))
        Curation([{str(src)!r}], opts, {str(work)!r}, shard_bytes=20_000).run()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 120
    done = []
    while time.time() < deadline and proc.poll() is None:
        done = list(work.glob("pass1-*/shard-*.done"))
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in work.glob("pass1-*/shard-*.done")}
    total = len(list(work.glob("read/shard-*.jsonl")))
    assert 2 <= len(finished) < total

    sys.path.insert(0, str(tmp_path))
    try:
        import slowstep  # noqa: F401 - registers the step in this process too

        opts = IngestOptions(name="t", steps=parse_steps(["exact_dedup", "slow"], "t"))
        mtimes = {p.name: p.stat().st_mtime_ns for p in work.glob("pass1-*/shard-*.done")}
        resumed = Curation([src], opts, work, shard_bytes=20_000).run()
        assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in work.glob("pass1-*/shard-*.done")
                   if p.name in mtimes), "finished shards were run again"
        fresh = Curation([src], opts, tmp_path / "fresh", shard_bytes=20_000).run()
    finally:
        sys.path.remove(str(tmp_path))
    assert (resumed.train_sha256, resumed.test_sha256) == (fresh.train_sha256, fresh.test_sha256)
    assert resumed.steps == fresh.steps


def test_ray_executor_gives_the_local_dataset_id(tmp_path):
    from stemma.data.curate.pipeline import RayExecutor

    src = _corpus(tmp_path, 80)
    local = Curation([src], IngestOptions(name="t"), tmp_path / "a", shard_bytes=20_000).run()
    ex = RayExecutor(workers=2)
    try:
        remote = Curation([src], IngestOptions(name="t"), tmp_path / "b", executor=ex, shard_bytes=20_000).run()
    finally:
        ex.close()
    assert (remote.train_sha256, remote.test_sha256) == (local.train_sha256, local.test_sha256)
    assert remote.steps == local.steps and remote.run["executor"] == "ray"


def _edit(text: str, every: int = 25) -> str:
    words = text.split()
    return " ".join(w.upper() if i % every == 0 else w for i, w in enumerate(words))


def test_tree_build_removes_training_documents_that_leak_another_datasets_test_split(tmp_path):
    """A test document of dataset B near-duplicated in dataset A's training split is leakage: removed from A."""
    from stemma.build import prepare_spec_datasets
    from stemma.data.read import doc_id, is_test
    from stemma.spec import parse_spec

    src = [json.loads(line)["text"][:3000] for line in open(CORPUS / "en-python.jsonl")][:80]
    fraction = 0.2
    b_test = next(t for t in src if is_test(doc_id(t)[1], fraction))  # lands in B's test split
    leak = _edit(b_test)
    assert not is_test(doc_id(leak)[1], 0.05), "pick another edit: the copy must land in A's training split"
    others = [t for t in src if t != b_test]
    _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in others[:40]] + [{"text": leak}])
    _jsonl(tmp_path / "b.jsonl", [{"text": t} for t in others[40:]] + [{"text": b_test}])
    spec = parse_spec({"datasets": {"a": {"paths": ["a.jsonl"], "curate": ["exact_dedup", "near_dedup"]},
                                    "b": {"paths": ["b.jsonl"], "test_fraction": fraction}},
                       "nodes": {"master": {"method": "pretrain", "dataset": "a"}}}, tmp_path)
    built = prepare_spec_datasets(spec, tmp_path / "work")
    a_train = {d["text"] for d in read_docs(built["a"].train)}
    assert leak not in a_train
    assert built["a"].datasheet["counts"]["documents"] == 40  # only the leak went
    near = next(s for s in built["a"].datasheet["curation"] if s["step"] == "near_dedup")
    assert near["kinds"] == {"leakage": 1} and near["removed"] == 1
    assert near["examples"][0]["id"] == doc_id(leak)[0]
    # B has no leakage step: its documents are all there.
    b = built["b"].datasheet["counts"]
    assert b["documents"] == b["documents_read"] == len(others[40:]) + 1


def test_a_trees_dataset_ids_do_not_depend_on_where_its_spec_lies(tmp_path):
    """Each dataset's curation sees every dataset's test split as a reference; their order (and so the ids) must
    follow the contents, not the work directories, which are named after file paths and times."""
    import shutil

    from stemma.build import prepare_spec_datasets
    from stemma.spec import parse_spec

    src = [json.loads(line)["text"][:2000] for line in open(CORPUS / "en-python.jsonl")][:60]
    first = tmp_path / "one"
    first.mkdir()
    for i in range(4):
        _jsonl(first / f"d{i}.jsonl", [{"text": t} for t in src[i * 15:(i + 1) * 15]])
    raw = {"datasets": {f"d{i}": {"paths": [f"d{i}.jsonl"], "test_fraction": 0.3,
                                  "curate": ["exact_dedup", "near_dedup", {"decontaminate": {"min_overlap": 5}}]}
                        for i in range(4)},
           "nodes": {"master": {"method": "pretrain", "dataset": "d0"}}}
    manifests = []
    for where in ("one", "elsewhere/two"):
        root = tmp_path / where
        if not root.exists():
            shutil.copytree(first, root)
        built = prepare_spec_datasets(parse_spec(raw, root), tmp_path / f"work-{where.replace('/', '-')}")
        manifests.append({name: b.manifest for name, b in built.items()})
    assert manifests[0] == manifests[1]


def test_workers_end_when_their_driver_is_killed(tmp_path):
    """A driver killed by SIGKILL cannot shut its pool down: its workers notice and exit instead of lingering."""
    import psutil

    script = textwrap.dedent("""
        import os, time
        from stemma.data.curate.pipeline import LocalExecutor
        from stemma.data.curate.pipeline import _worker_pid
        if __name__ == "__main__":
            ex = LocalExecutor(2)
            print(" ".join(map(str, sorted(set(ex.map(_worker_pid, list(range(8))))))), flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "driver.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and proc.pid not in pids
        assert all(psutil.pid_exists(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 15
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived their killed driver"
