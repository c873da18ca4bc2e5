"""Data-parallel builds (`stemma build --nproc 2`, gloo on the CPU): the loss curves of two processes equal one
process's on the same global batch, the number of processes is no part of the recipe, a batch two processes cannot
share is refused before anything is written, and a build whose second rank is killed with SIGKILL resumes from
rank 0's checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from stemma import distributed
from stemma.build import build
from stemma.errors import SpecError, StemmaError
from stemma.spec import load_spec
from stemma.train.parallel import World
from stemma.workspace import Workspace
from tests.conftest import CORPUS, tiny_corpus

MASTER_STEPS = 24
MASTER = {"n_layer": 2, "n_embd": 64, "n_head": 2, "context": 32, "vocab_size": 384, "steps": MASTER_STEPS,
          "batch_size": 8, "lr": 0.003, "warmup": 2, "checkpoint_every_s": 0}
CHILD = {"steps": 5, "batch_size": 8, "warmup": 2}  # 6 own + 2 replay rows: 3 + 1 for each of two processes
GAP = 1e-4
"""Largest relative gap allowed between the loss curves of one and two processes at any step: the data and the mean
gradient are the same, only the order of float additions differs (measured: about 4e-7, the curve's rounding)."""


DATASETS = {"all": {"paths": ["corpus"], "language": "multi", "max_doc_chars": 1500},
            "software": {"paths": ["corpus/en-manpages.jsonl"], "language": "en", "max_doc_chars": 1500}}


def spec_file(d: Path, nodes: dict) -> Path:
    """A tree of ``nodes`` declaring the datasets they use (each declared one is curated by every build)."""
    tiny_corpus(d)
    shutil.copy(CORPUS.parent / "align" / "sft.jsonl", d / "sft.jsonl")
    used = {n["dataset"] for n in nodes.values() if "dataset" in n}
    spec = {"name": "ddp", "datasets": {k: v for k, v in DATASETS.items() if k in used}, "nodes": nodes}
    path = d / "stemma.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def every_method(d: Path) -> Path:
    """pretrain -> distill -> (lora, finetune, sft): each data-parallel method once, tiny and short (the master
    checkpoints every step)."""
    return spec_file(d, {
        "master": {"method": "pretrain", "dataset": "all", "config": MASTER},
        "en": {"method": "distill", "dataset": "software", "config": {**CHILD, "n_layer": 1, "max_param_ratio": 1.0}},
        "en/lora": {"method": "lora", "dataset": "software", "config": CHILD},
        "en/full": {"method": "finetune", "dataset": "software", "config": {**CHILD, "l2sp": 0.1}},
        "en/chat": {"method": "sft", "config": {**CHILD, "pairs": "sft.jsonl"}},
    })


def cli(home: Path, *args: str, wait: bool = True):
    env = {**os.environ, "STEMMA_HOME": str(home), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stemma.cli", "build", *args, "--no-footprint"]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def build_here(home: Path, spec: Path, **kw):
    """A one-process build in this process (faster than a child: torch is imported already)."""
    ws = Workspace.init(home)
    return ws, build(ws, load_spec(spec), **kw)


def largest_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def test_share_takes_contiguous_rows_and_refuses_uneven_ones():
    rows = torch.arange(12).view(6, 2)
    assert World(rank=1, size=2).share(rows).tolist() == [[6, 7], [8, 9], [10, 11]]
    assert World(rank=0, size=3).share(list("abcdef")) == ["a", "b"]
    assert World().share(rows) is rows
    with pytest.raises(StemmaError, match="5 rows of a batch cannot be shared evenly by 2 processes"):
        World(rank=0, size=2).share(list("abcde"))


def test_a_batch_two_processes_cannot_share_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMMA_HOME", str(tmp_path / "home"))
    spec = spec_file(tmp_path, {"master": {"method": "pretrain", "dataset": "all", "config": MASTER},
                                "en": {"method": "lora", "dataset": "software", "config": {**CHILD, "batch_size": 12}}})
    ws = Workspace.init(tmp_path / "home")
    with pytest.raises(SpecError) as e, distributed.lead(World(rank=0, size=2)):
        build(ws, load_spec(spec))
    assert str(e.value) == ("node en: batch_size 12 (9 own + 3 replay rows) cannot be shared evenly by 2 processes; "
                            "choose one whose parts are multiples of 2")
    assert ws.nodes() == [] and ws.list_datasets() == []
    assert distributed.build_world().size == 1  # leaving after an error sends nothing and restores one process
    distributed.preflight(load_spec(spec), {"master"}, World(rank=0, size=2))  # the master alone: its 8 rows share


def checkpointed(home: Path) -> int:
    """The step of the build's checkpoint (0 without one)."""
    for state in (home / "work").glob("*/checkpoint/state.json"):
        try:
            return json.loads(state.read_text())["step"]
        except (OSError, ValueError):  # swapped out while read
            pass
    return 0


def _rank(proc: subprocess.Popen, rank: int) -> psutil.Process | None:
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "stemma.cli" in p.cmdline():
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.timeout(240)
def test_two_processes_killed_and_resumed_train_every_method_as_one_process_does(tmp_path):
    """One build in two processes, its rank 1 killed with SIGKILL while the master trains, then run again: it resumes
    from rank 0's checkpoint, and every method's loss curve and the master's weights are one process's."""
    spec = every_method(tmp_path)
    home = tmp_path / "two"
    proc = cli(home, str(spec), "--nproc", "2", wait=False)
    deadline = time.time() + 150
    try:
        while time.time() < deadline and proc.poll() is None:  # until rank 0 has checkpointed a few steps
            if checkpointed(home) >= 3:
                break
            time.sleep(0.05)
        victim = _rank(proc, 1)
        assert victim is not None and proc.poll() is None, proc.communicate()
        victim.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    ws2 = Workspace.open(home)
    assert ws2.nodes() == []  # nothing half-published
    done = cli(home, str(spec), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    step = int(done.stderr.split("resuming from checkpoint at step ")[1].split("/")[0])
    assert 3 <= step < MASTER_STEPS

    ws1, events = build_here(tmp_path / "one", spec, evaluate=False)
    assert [e.action for e in events] == ["built"] * 5
    for node in ("master", "en", "en/lora", "en/full", "en/chat"):
        one, two = ws1.resolve_version(node).manifest["train"], ws2.resolve_version(node).manifest["train"]
        assert len(one["loss_curve"]["loss"]) == one["steps"] and one["tokens"] == two["tokens"]
        assert largest_gap(one["loss_curve"]["loss"], two["loss_curve"]["loss"]) < GAP, (node, one, two)
    w1, w2 = ws1.load_model(ws1.resolve_version("master").id), ws2.load_model(ws2.resolve_version("master").id)
    for (name, p1), p2 in zip(w1.state_dict().items(), w2.state_dict().values()):
        # Within 1e-3 of each tensor's norm; all but the attention's query-key-value bias agree to about 1e-7. That
        # bias's key part gets a gradient of rounding noise only (softmax ignores what is added to every key), which
        # Adam scales up to steps the size of the learning rate: it differs by about 1e-4 of its norm.
        assert float((p1 - p2).norm()) <= 1e-3 * float(p1.norm()), name
    assert ws2.fsck().clean and not list((home / "work").glob("*/checkpoint*"))

    # The number of processes is no part of the recipe: one process reuses every version two processes built.
    ids = {n.path: n.current_version for n in ws2.nodes()}
    _, again = build_here(home, spec, evaluate=False)
    assert {e.node: (e.action, e.version) for e in again} == {n: ("reused", v) for n, v in ids.items()}
