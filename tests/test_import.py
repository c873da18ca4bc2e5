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


class _System:
    """Unpickling this runs a shell command: what a hostile checkpoint carries. It is only ever written."""

    def __reduce__(self):
        import os

        return (os.system, ("echo owned > /tmp/stemma-owned",))


def _versions(ws) -> int:
    from sqlalchemy import func, select

    from stemma.registry.tables import Version

    with ws.db.session() as s:
        return s.scalar(select(func.count()).select_from(Version))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "training_args.pkl", "sub/extra.pt"])
def test_malicious_pickle_beside_safetensors_is_refused_with_the_finding(ws, tmp_path, name):
    import pickle

    from tests.conftest import save_hf_checkpoint

    ckpt = save_hf_checkpoint(tmp_path / "ckpt", "llama")  # its safetensors are fine; one more file is not
    (ckpt / name).parent.mkdir(exist_ok=True)
    (ckpt / name).write_bytes(pickle.dumps({"weights": _System()}, protocol=2))
    before = set(ws.store.iter_digests())
    with pytest.raises(UnsafeArtifactError) as e:
        build(ws, load_spec(_spec(tmp_path, ckpt)))
    msg = str(e.value)
    assert "\n" not in msg and f"{name} imports posix.system (CRITICAL)" in msg and "modelscan" in msg, msg
    assert ws.nodes() == [] and _versions(ws) == 0
    assert set(ws.store.iter_digests()) == before


def test_clean_pickle_is_refused_too(ws, tmp_path):
    import pickle

    from tests.conftest import save_hf_checkpoint

    ckpt = save_hf_checkpoint(tmp_path / "ckpt", "gpt2")
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"lr": 0.1}))
    with pytest.raises(UnsafeArtifactError, match="optimizer.pt is pickle-based .*found no unsafe import"):
        build(ws, load_spec(_spec(tmp_path, ckpt)))
    assert ws.nodes() == []


def test_clean_checkpoint_manifest_carries_the_scan_and_the_same_id(ws, tmp_path):
    from stemma.workspace import Workspace
    from tests.conftest import save_hf_checkpoint

    ckpt = save_hf_checkpoint(tmp_path / "ckpt", "gpt2")
    spec = load_spec(_spec(tmp_path, ckpt))
    build(ws, spec, only=["master"], evaluate=False)
    master = ws.resolve_version("master")
    scan = master.manifest["scan"]
    assert scan["scanner"] == "modelscan" and scan["version"] and scan["issues"] == []
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(scan["files"])
    other = Workspace.init(tmp_path / "other-home")  # the same checkpoint elsewhere: the same version id
    build(other, spec, only=["master"], evaluate=False)
    assert other.resolve_version("master").id == master.id


# ---------------------------------------------------------------------------------------------- Llama-layout masters
def _family_spec(d, ckpt):
    """An imported master with a child of every kind: distilled, LoRA, full finetune, int8 and pruned variants."""
    tiny_corpus(d)
    child = {"steps": 6, "batch_size": 4}
    spec = {
        "datasets": {"en": {"paths": ["corpus/en-manpages.jsonl"], "max_doc_chars": 1500}},
        "nodes": {
            "master": {"method": "import", "config": {"path": str(ckpt)}},
            "en": {"method": "distill", "dataset": "en", "config": {"n_layer": 2, "max_param_ratio": 0.8, **child}},
            "en/software": {"method": "lora", "dataset": "en", "config": dict(child)},
            "en/legal": {"method": "finetune", "dataset": "en", "config": dict(child)},
            "en/software/int8": {"method": "quantized", "parent": "en/software", "layer": "device",
                                 "config": {"bits": 8}},
        },
    }
    (d / "stemma.yaml").write_text(yaml.safe_dump(spec))
    return d / "stemma.yaml"


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("mistral", {}),
    ("qwen2", {}),
])
def test_llama_layout_master_through_every_method(ws, tmp_path, model_type, extra):
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_hf_checkpoint

    ckpt = save_hf_checkpoint(tmp_path / "ckpt", model_type, **extra)
    events = build(ws, load_spec(_family_spec(tmp_path, ckpt)))
    assert {e.action for e in events} == {"built"}
    master = ws.resolve_version("master")
    assert master.manifest["architecture"]["family"] == "llama"
    assert master.manifest["architecture"]["model_type"] == model_type
    original = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.allclose(ws.load_model(master.id)(input_ids=x).logits, original(input_ids=x).logits, atol=1e-5)
    en = ws.resolve_version("en")
    student = ws.load_model(en.id)
    assert type(student).__name__ == type(original).__name__  # the teacher's family, not a GPT-2
    assert student.config.num_hidden_layers == 2
    assert en.manifest["architecture"]["init_teacher_layers"] == [0, 3]
    sw = ws.resolve_version("en/software")
    targets = set(sw.manifest["architecture"]["adapter"]["targets"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for node in ("en", "en/software", "en/legal", "en/software/int8"):
        v = ws.resolve_version(node)
        ds = ws.version_datasets(v.id)["train"] if node != "en/software/int8" else None
        if ds:
            assert ws.get_metric(v.id, "perplexity", ds, "test") is not None, node


@pytest.mark.parametrize("model_type,extra,field", [
    ("mistral", {"sliding_window": 16}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding_window"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}},
     "rope_scaling"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}, "model_type"),
])
def test_unsupported_architecture_refused_before_anything_is_stored(ws, tmp_path, model_type, extra, field):
    from stemma.errors import StemmaError
    from tests.conftest import save_hf_checkpoint

    if model_type == "mistral":
        extra = {**extra}
    ckpt = save_hf_checkpoint(tmp_path / "ckpt", model_type, **extra)
    if model_type == "mistral":  # save_hf_checkpoint turns the window off for mistral unless asked
        import json

        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["sliding_window"] = extra["sliding_window"]
        (ckpt / "config.json").write_text(json.dumps(cfg))
    before = set(ws.store.iter_digests())
    with pytest.raises(StemmaError) as e:
        build(ws, load_spec(_family_spec(tmp_path, ckpt)))
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg
    assert ws.nodes() == []
    assert set(ws.store.iter_digests()) == before


@pytest.mark.parametrize("config,field", [
    ({"arch": "bert"}, "bert"),
    ({"arch": "llama", "n_head": 4, "n_kv_head": 3}, "n_kv_head"),
    ({"arch": "gpt2", "n_kv_head": 2}, "n_kv_head"),
    ({"arch": "llama", "n_embd": 30, "n_head": 4}, "n_embd"),
])
def test_bad_pretrain_shape_fails_in_the_spec(tmp_path, config, field):
    from stemma.errors import SpecError
    from stemma.spec import parse_spec

    tiny_corpus(tmp_path)
    data = {"datasets": {"all": {"paths": ["corpus"]}},
            "nodes": {"master": {"method": "pretrain", "dataset": "all", "config": config}}}
    with pytest.raises(SpecError, match=field):
        parse_spec(data, tmp_path)
