"""Fixtures for the server tests: one pool / app over the session's tiny tree, and a helper that runs sequences."""

from __future__ import annotations

import contextlib
import threading

import pytest


@contextlib.contextmanager
def _open(tree):
    """A workspace on a session tree, with STEMMA_HOME pointing at it meanwhile."""
    import os

    from stemma.workspace import Workspace

    old = os.environ.get("STEMMA_HOME")
    os.environ["STEMMA_HOME"] = str(tree["home"])
    try:
        yield Workspace.open(tree["home"])
    finally:
        if old is None:
            os.environ.pop("STEMMA_HOME", None)
        else:
            os.environ["STEMMA_HOME"] = old


@pytest.fixture(scope="module")
def tree_ws(built_tree):
    """A workspace on the session GPT-2 tree (read-only use)."""
    with _open(built_tree) as ws:
        yield ws


@pytest.fixture(scope="module")
def llama_ws(llama_tree):
    """A workspace on the session Llama tree (read-only use)."""
    with _open(llama_tree) as ws:
        yield ws


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_ws(request):
    """Each family's session tree in turn (read-only use)."""
    with _open(request.getfixturevalue("built_tree" if request.param == "gpt2" else "llama_tree")) as ws:
        yield ws


def run_sequences(pool, jobs, timeout: float = 60.0):
    """Submit (model, prompt ids, SamplingParams) jobs all at once; returns their finished Sequences and events."""
    from stemma.serve.engine import Sequence

    done = threading.Semaphore(0)
    seqs, events = [], []
    for model, prompt, params in jobs:
        t = pool.resolve(model)
        evs: list = []
        events.append(evs)

        def sink(ev, evs=evs):
            evs.append(ev)
            if ev.done:
                done.release()

        seqs.append((t, Sequence(prompt=list(prompt), params=params, adapter=t.adapters, sink=sink, label=model)))
    # One submit per engine, so sequences of different adapters start in the same batch.
    by_engine: dict = {}
    for t, s in seqs:
        by_engine.setdefault(id(pool.engine(t)), (pool.engine(t), []))[1].append(s)
    for engine, group in by_engine.values():
        engine.submit(group)
    pool.scheduler.notify()
    for _ in seqs:
        assert done.acquire(timeout=timeout), "a sequence did not finish"
    return [s for _, s in seqs], events
