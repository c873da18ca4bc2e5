"""Shared fixtures: an isolated STEMMA_HOME per test, a small corpus cut from the shipped demo corpus,
and one tiny tree built once per session (master -> distilled language -> LoRA -> LoRA chain, finetune)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "demo" / "corpus"


def write_subset(src: Path, dst: Path, n: int, max_chars: int = 3000) -> Path:
    """The first ``n`` documents of a shipped JSONL file, each cut to ``max_chars``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src) as f, open(dst, "w") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            d = json.loads(line)
            d["text"] = d["text"][:max_chars]
            out.write(json.dumps(d) + "\n")
    return dst


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("STEMMA_HOME", str(h))
    monkeypatch.delenv("STEMMA_REGISTRY_URL", raising=False)
    return h


@pytest.fixture
def ws(home):
    from stemma.workspace import Workspace

    return Workspace.init(home)


TINY_MASTER = {"n_layer": 6, "n_embd": 64, "n_head": 2, "context": 64, "vocab_size": 512, "steps": 60,
               "batch_size": 8, "lr": 0.003, "warmup": 5}
TINY_CHILD = {"steps": 40, "batch_size": 8, "warmup": 4}


def tiny_corpus(dirpath: Path) -> Path:
    corpus = dirpath / "corpus"
    write_subset(CORPUS / "en-manpages.jsonl", corpus / "en-manpages.jsonl", 30)
    write_subset(CORPUS / "de-manpages.jsonl", corpus / "de-manpages.jsonl", 20)
    write_subset(CORPUS / "en-python.jsonl", corpus / "en-python.jsonl", 20)
    write_subset(CORPUS / "en-legal.jsonl", corpus / "en-legal.jsonl", 8, max_chars=6000)
    return corpus


def tiny_spec(dirpath: Path, **overrides) -> Path:
    """A five-node tree on a small corpus; ``overrides`` replace node configs (``{"en": {...}}``)."""
    tiny_corpus(dirpath)
    spec = {
        "name": "tiny",
        "datasets": {
            "all": {"paths": ["corpus"], "language": "multi", "max_doc_chars": 1500},
            "en": {"paths": ["corpus/en-manpages.jsonl", "corpus/en-python.jsonl", "corpus/en-legal.jsonl"],
                   "language": "en", "max_doc_chars": 1500},
            "en-software": {"paths": ["corpus/en-manpages.jsonl"], "language": "en", "max_doc_chars": 1500},
            "en-python": {"paths": ["corpus/en-python.jsonl"], "language": "en", "max_doc_chars": 1500},
            "en-legal": {"paths": ["corpus/en-legal.jsonl"], "language": "en", "max_doc_chars": 1500},
        },
        "nodes": {
            "master": {"method": "pretrain", "dataset": "all", "config": dict(TINY_MASTER)},
            "en": {"method": "distill", "dataset": "en", "config": {"n_layer": 2, **TINY_CHILD}},
            "en/software": {"method": "lora", "dataset": "en-software", "config": dict(TINY_CHILD)},
            "en/software/python": {"method": "lora", "dataset": "en-python", "config": dict(TINY_CHILD)},
            "en/legal": {"method": "finetune", "dataset": "en-legal", "config": dict(TINY_CHILD)},
        },
    }
    for node, cfg in overrides.items():
        spec["nodes"][node]["config"].update(cfg)
    path = dirpath / "stemma.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def built_tree(tmp_path_factory):
    """One tiny tree, built once; tests must treat it as read-only (copy it to modify)."""
    from stemma.build import build
    from stemma.spec import load_spec
    from stemma.workspace import Workspace

    d = tmp_path_factory.mktemp("tree")
    spec_path = tiny_spec(d)
    home = d / "home"
    old = os.environ.get("STEMMA_HOME")
    os.environ["STEMMA_HOME"] = str(home)
    try:
        ws = Workspace.init(home)
        events = build(ws, load_spec(spec_path))
    finally:
        if old is None:
            os.environ.pop("STEMMA_HOME", None)
        else:
            os.environ["STEMMA_HOME"] = old
    return {"home": home, "spec": spec_path, "dir": d, "events": events}


@pytest.fixture
def tree_copy(built_tree, tmp_path, monkeypatch):
    """A private, writable copy of the session tree (home + spec + corpus)."""
    dst = tmp_path / "tree"
    shutil.copytree(built_tree["dir"], dst, symlinks=True)
    monkeypatch.setenv("STEMMA_HOME", str(dst / "home"))
    monkeypatch.delenv("STEMMA_REGISTRY_URL", raising=False)
    from stemma.workspace import Workspace

    return {"home": dst / "home", "spec": dst / "stemma.yaml", "dir": dst, "ws": Workspace.open(dst / "home")}


VARIANTS = {
    "int8": {"method": "quantized", "config": {"bits": 8}},
    "int4": {"method": "quantized", "config": {"bits": 4}},
    "lowrank": {"method": "lowrank", "config": {"rank": 8}},
    "sparse": {"method": "pruned", "config": {"sparsity": 0.5}},
    "slim": {"method": "pruned", "config": {"mode": "structured", "neurons": 0.5, "heads": 0.5, "recovery_steps": 4}},
}


def add_variants(spec_path: Path, node: str = "en/software/python") -> Path:
    """Declare every compression variant of ``node`` as a device-layer child in the spec file."""
    spec = yaml.safe_load(spec_path.read_text())
    for name, v in VARIANTS.items():
        spec["nodes"][f"{node}/{name}"] = {**v, "parent": node, "layer": "device"}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


@pytest.fixture(scope="session")
def variant_tree(built_tree, tmp_path_factory):
    """The session tree plus every compression variant of en/software/python, with measured footprints."""
    from stemma.build import build
    from stemma.spec import load_spec
    from stemma.workspace import Workspace

    d = tmp_path_factory.mktemp("variants") / "tree"
    shutil.copytree(built_tree["dir"], d, symlinks=True)
    spec_path = add_variants(d / "stemma.yaml")
    old = os.environ.get("STEMMA_HOME")
    os.environ["STEMMA_HOME"] = str(d / "home")
    try:
        ws = Workspace.open(d / "home")
        events = build(ws, load_spec(spec_path), footprint=True)
    finally:
        if old is None:
            os.environ.pop("STEMMA_HOME", None)
        else:
            os.environ["STEMMA_HOME"] = old
    return {"home": d / "home", "spec": spec_path, "dir": d, "events": events}


@pytest.fixture
def variants(variant_tree, tmp_path, monkeypatch):
    """A private, writable copy of the variant tree."""
    dst = tmp_path / "vtree"
    shutil.copytree(variant_tree["dir"], dst, symlinks=True)
    monkeypatch.setenv("STEMMA_HOME", str(dst / "home"))
    monkeypatch.delenv("STEMMA_REGISTRY_URL", raising=False)
    from stemma.workspace import Workspace

    return {"home": dst / "home", "spec": dst / "stemma.yaml", "dir": dst, "ws": Workspace.open(dst / "home")}
