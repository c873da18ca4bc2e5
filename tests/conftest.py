"""Shared fixtures: an isolated STEMMA_HOME per test, a small corpus cut from the shipped demo corpus,
and one tiny tree built once per session (master -> distilled language -> LoRA -> LoRA chain, finetune)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.pg import pg_cluster, pg_tree, pg_tree_copy, pg_url, registry_tree, registry_url  # noqa: F401

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
TINY_LLAMA = {"arch": "llama", "n_head": 4, "n_kv_head": 2, "n_inner": 160, "rope_theta": 10000.0}
"""The tiny master in the Llama layout: grouped-query attention (4 query heads share 2 KV heads), SwiGLU, RoPE."""


def tiny_corpus(dirpath: Path) -> Path:
    corpus = dirpath / "corpus"
    write_subset(CORPUS / "en-manpages.jsonl", corpus / "en-manpages.jsonl", 30)
    write_subset(CORPUS / "de-manpages.jsonl", corpus / "de-manpages.jsonl", 20)
    write_subset(CORPUS / "en-python.jsonl", corpus / "en-python.jsonl", 20)
    write_subset(CORPUS / "en-legal.jsonl", corpus / "en-legal.jsonl", 8, max_chars=6000)
    return corpus


def tiny_spec(dirpath: Path, arch: str = "gpt2", **overrides) -> Path:
    """A five-node tree on a small corpus; ``overrides`` replace node configs (``{"en": {...}}``); ``arch`` is the
    master's family (``llama``: `TINY_LLAMA`)."""
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
    if arch == "llama":
        spec["nodes"]["master"]["config"].update(TINY_LLAMA)
    for node, cfg in overrides.items():
        spec["nodes"][node]["config"].update(cfg)
    path = dirpath / "stemma.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _build_tree(tmp_path_factory, arch: str, url: str | None = None) -> dict:
    """Build the tiny tree in a new home; its registry is the home's SQLite file, or the database at ``url``."""
    from stemma.build import build
    from stemma.spec import load_spec
    from stemma.workspace import Workspace

    d = tmp_path_factory.mktemp(f"tree-{arch}")
    spec_path = tiny_spec(d, arch=arch)
    home = d / "home"
    env = {"STEMMA_HOME": str(home), "STEMMA_REGISTRY_URL": url}
    old = {k: os.environ.get(k) for k in env}
    _setenv(env)
    try:
        ws = Workspace.init(home)
        events = build(ws, load_spec(spec_path), footprint=True)  # as `stemma build` does by default
        ws.db.engine.dispose()
    finally:
        _setenv(old)
    return {"home": home, "spec": spec_path, "dir": d, "events": events, "arch": arch, "registry_url": url}


def _setenv(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def built_tree(tmp_path_factory):
    """One tiny GPT-2 tree, built once with footprints; tests must treat it as read-only (copy it to modify)."""
    return _build_tree(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def llama_tree(tmp_path_factory):
    """The same tiny tree with a Llama-layout master (GQA, RoPE, SwiGLU), built once; read-only."""
    return _build_tree(tmp_path_factory, "llama")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def any_tree(request):
    """Each family's session tree in turn (tests that must hold for every family)."""
    return request.getfixturevalue("built_tree" if request.param == "gpt2" else "llama_tree")


def _copy_tree(src: dict, dst: Path, monkeypatch) -> dict:
    shutil.copytree(src["dir"], dst, symlinks=True)
    monkeypatch.setenv("STEMMA_HOME", str(dst / "home"))
    monkeypatch.delenv("STEMMA_REGISTRY_URL", raising=False)
    from stemma.workspace import Workspace

    return {"home": dst / "home", "spec": dst / "stemma.yaml", "dir": dst, "ws": Workspace.open(dst / "home"),
            "arch": src.get("arch", "gpt2")}


@pytest.fixture
def tree_copy(built_tree, tmp_path, monkeypatch):
    """A private, writable copy of the session GPT-2 tree (home + spec + corpus)."""
    return _copy_tree(built_tree, tmp_path / "tree", monkeypatch)


@pytest.fixture
def llama_copy(llama_tree, tmp_path, monkeypatch):
    """A private, writable copy of the session Llama tree."""
    return _copy_tree(llama_tree, tmp_path / "tree", monkeypatch)


@pytest.fixture
def any_copy(any_tree, tmp_path, monkeypatch):
    """A private, writable copy of each family's session tree in turn."""
    return _copy_tree(any_tree, tmp_path / "tree", monkeypatch)


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


def _build_variants(tree: dict, tmp_path_factory) -> dict:
    from stemma.build import build
    from stemma.spec import load_spec
    from stemma.workspace import Workspace

    d = tmp_path_factory.mktemp(f"variants-{tree.get('arch', 'gpt2')}") / "tree"
    shutil.copytree(tree["dir"], d, symlinks=True)
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
    return {"home": d / "home", "spec": spec_path, "dir": d, "events": events, "arch": tree.get("arch", "gpt2")}


@pytest.fixture(scope="session")
def variant_tree(built_tree, tmp_path_factory):
    """The session tree plus every compression variant of en/software/python, with measured footprints and the
    selector's measurements for en/software/python (each GGUF's perplexity in llama.cpp) stored once."""
    from stemma.select import select
    from stemma.workspace import Workspace

    tree = _build_variants(built_tree, tmp_path_factory)
    ws = Workspace.open(tree["home"])
    select(ws, "en", "software/python")
    ws.db.engine.dispose()
    return tree


@pytest.fixture(scope="session")
def llama_variant_tree(llama_tree, tmp_path_factory):
    """The Llama session tree plus every compression variant of en/software/python, with measured footprints."""
    return _build_variants(llama_tree, tmp_path_factory)


@pytest.fixture
def variants(variant_tree, tmp_path, monkeypatch):
    """A private, writable copy of the variant tree."""
    return _copy_tree(variant_tree, tmp_path / "vtree", monkeypatch)


@pytest.fixture
def llama_variants(llama_variant_tree, tmp_path, monkeypatch):
    """A private, writable copy of the Llama variant tree."""
    return _copy_tree(llama_variant_tree, tmp_path / "vtree", monkeypatch)


def save_hf_checkpoint(dirpath: Path, model_type: str = "llama", tokenizer_from: Path | None = None, seed: int = 0,
                       **config) -> Path:
    """A random tiny Hugging Face checkpoint of ``model_type`` (llama, mistral, qwen2, gpt2) written by
    ``save_pretrained`` with safetensors and a ``tokenizer.json`` trained on the test corpus: what a user brings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stemma.models.tokenizer import TokenizerConfig, tokenizer_to_bytes, train_tokenizer

    texts = [json.loads(line)["text"][:2000] for line in (CORPUS / "en-manpages.jsonl").open()][:40]
    tok = train_tokenizer(texts, TokenizerConfig(384, 2))
    defaults = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
                "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=64)}
    base = dict(defaults["gpt2" if model_type == "gpt2" else "llama"])
    if model_type == "mistral":
        base["sliding_window"] = None
    base.update(config)
    cfg = AutoConfig.for_model(model_type, vocab_size=tok.get_vocab_size(), **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    dirpath.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dirpath, safe_serialization=True)
    (dirpath / "tokenizer.json").write_bytes(tokenizer_to_bytes(tok))
    return dirpath
