"""A local Hugging Face checkpoint as the master: safetensors only, lineage by content."""

import shutil

import pytest
import torch
import yaml

from stemma.build import build
from stemma.errors import UnsafeArtifactError
from stemma.spec import load_spec
from tests.conftest import tiny_corpus


def _checkpoint(path, arch="gpt2"):
    """A small checkpoint, written the way a user's training run would write one."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from stemma.models.tokenizer import TokenizerConfig, train_tokenizer

    texts = [f"line {i} of a small corpus about tools and files" for i in range(200)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64))
    model.eval()  # as loaded: no dropout
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    assert isinstance(Tokenizer.from_file(str(path / "tokenizer.json")), Tokenizer)
    return model


def _spec(d, ckpt):
    tiny_corpus(d)
    spec = {
        "datasets": {"en": {"paths": ["corpus/en-manpages.jsonl"], "max_doc_chars": 1500}},
        "nodes": {
            "master": {"method": "import", "config": {"path": str(ckpt)}},
            "en": {"method": "lora", "dataset": "en", "config": {"steps": 5, "batch_size": 4}},
        },
    }
    (d / "stemma.yaml").write_text(yaml.safe_dump(spec))
    return d / "stemma.yaml"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_then_adapter_child(ws, tmp_path, arch):
    ckpt = tmp_path / "ckpt"
    original = _checkpoint(ckpt, arch)
    events = build(ws, load_spec(_spec(tmp_path, ckpt)))
    assert [e.action for e in events] == ["built", "built"]
    master = ws.resolve_version("master")
    assert master.row.relation == "import"
    loaded = ws.load_model(master.id)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, original(input_ids=x).logits, atol=1e-5)
    assert ws.resolve_version("en").row.relation == "adapter"


def test_lineage_is_by_content_not_path(ws, tmp_path):
    a = tmp_path / "a"
    _checkpoint(a)
    first = build(ws, load_spec(_spec(tmp_path, a)))
    b = tmp_path / "moved"
    shutil.move(a, b)
    again = build(ws, load_spec(_spec(tmp_path, b)))
    assert [e.action for e in again] == ["reused", "reused"]
    assert first[0].version == again[0].version


def test_pickle_checkpoint_is_refused(ws, tmp_path):
    ckpt = tmp_path / "ckpt"
    _checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    before = set(ws.store.iter_digests())
    with pytest.raises(UnsafeArtifactError, match="pickle"):
        build(ws, load_spec(_spec(tmp_path, ckpt)))
    assert ws.nodes() == []
    assert set(ws.store.iter_digests()) == before
