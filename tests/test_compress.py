"""Compression methods: the layers against dense references, and the variants built as children of a node."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from stemma.compress.layers import (
    LowRankLinear,
    QuantLinear,
    dequantize_int4,
    pack_sparse,
    quantize_int4,
    quantize_int8,
    rank_for_energy,
    unpack_sparse,
)
from stemma.errors import SpecError
from stemma.models.arch import count_params

SP = "en/software/python"


def _conv(n_in=64, n_out=96, seed=0):
    torch.manual_seed(seed)
    m = Conv1D(n_out, n_in)
    nn.init.normal_(m.weight, std=0.05)
    nn.init.normal_(m.bias, std=0.01)
    return m


def test_int8_error_is_within_half_a_step_per_channel():
    w = torch.randn(96, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [16, 32, 64])
def test_int4_packing_roundtrips_and_error_is_bounded(group):
    w = torch.randn(48, 64)
    packed, scales = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32) and scales.shape == (48, 64 // group)
    deq = dequantize_int4(packed, scales)
    step = scales.float().repeat_interleave(group, dim=1)
    # Clipped values may err by more than half a step, but never beyond the clipping range (25% of absmax).
    assert ((deq - w).abs() <= torch.maximum(step / 2 + 1e-3, 0.26 * w.abs().amax())).all()
    rel = (deq - w).norm() / w.norm()
    assert rel < 0.12


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_forward_equals_dense_layer_of_its_dequantised_weight(bits):
    m = _conv()
    q = QuantLinear.from_linear(m, bits, group_size=32)
    x = torch.randn(3, 5, 64)
    ref = x @ q.dequantized().t() + m.bias
    assert torch.allclose(q(x), ref, atol=1e-4)
    # ... and close to the original layer
    assert (q(x) - m(x)).norm() / m(x).norm() < (0.01 if bits == 8 else 0.15)


def test_lowrank_at_full_rank_is_exact_and_energy_picks_the_rank():
    m = _conv(32, 48)
    full = LowRankLinear.from_linear(m, 32)
    x = torch.randn(4, 32)
    assert torch.allclose(full(x), m(x), atol=1e-4)
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 0.5) == 1 and rank_for_energy(s, 0.9) == 2 and rank_for_energy(s, 1.0) == 3


def test_sparse_packing_is_lossless():
    w = torch.randn(7, 13)
    w[w.abs() < 0.7] = 0
    p = pack_sparse(w, torch.float32)
    assert p["mask"].numel() == (91 + 7) // 8
    assert torch.equal(unpack_sparse(p["mask"], p["values"], [7, 13]), w)


@pytest.mark.parametrize("raw, msg", [
    ({"method": "lowrank", "config": {}}, "exactly one of rank or energy"),
    ({"method": "lowrank", "config": {"energy": 1.5}}, "energy must be"),
    ({"method": "quantized", "config": {"bits": 3}}, "bits"),
    ({"method": "pruned", "config": {"sparsity": 1.0}}, "sparsity must be"),
    ({"method": "pruned", "config": {"recovery_steps": 5}}, "structured pruning only"),
])
def test_bad_variant_configs_are_refused(tmp_path, raw, msg):
    from stemma.spec import parse_spec

    (tmp_path / "c.txt").write_text("a")
    with pytest.raises(SpecError, match=msg):
        parse_spec({"datasets": {"d": {"paths": ["c.txt"]}}, "nodes": {
            "master": {"method": "pretrain", "dataset": "d"}, "master/v": {**raw, "layer": "device"}}}, tmp_path)


# ---------------------------------------------------------------------------------------------- built variants
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name, tol", [("int8", 0.02), ("int4", 0.25), ("lowrank", 0.6), ("sparse", 0.6),
                                       ("slim", 1.0)])
def test_variants_load_standalone_and_stay_close_to_their_parent(variants, name, tol):
    ws = variants["ws"]
    v = ws.resolve_version(f"{SP}/{name}")
    parent = ws.resolve_version(SP)
    assert v.row.parent_id == parent.id
    assert v.row.relation in ("quantized", "lowrank", "pruned")
    model, ref = ws.load_model(v.id), ws.load_model(parent.id)
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    a, b = _logits(model, ids), _logits(ref, ids)
    assert (a - b).norm() / b.norm() < tol
    # Stored as safetensors only, smaller than the merged parent in fp32.
    assert all(n.endswith((".json", ".safetensors")) for n in v.manifest["files"])
    fp32 = count_params(ref) * 4
    assert v.row.bytes < fp32


def test_quantised_models_hold_integer_weights_in_memory(variants):
    ws = variants["ws"]
    m8 = ws.load_model(ws.resolve_version(f"{SP}/int8").id)
    m4 = ws.load_model(ws.resolve_version(f"{SP}/int4").id)
    assert m8.transformer.h[0].attn.c_attn.qweight.dtype == torch.int8
    assert m4.transformer.h[0].mlp.c_fc.qweight.dtype == torch.uint8
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in m8.parameters())
    out = m8.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_variant_perplexity_is_evaluated_on_the_parents_split(variants):
    ws = variants["ws"]
    parent = ws.resolve_version(SP)
    ds = ws.version_datasets(parent.id)["train"]
    base = ws.get_metric(parent.id, "perplexity", ds, "test")
    for name, limit in [("int8", 0.02), ("int4", 0.10)]:
        v = ws.resolve_version(f"{SP}/{name}")
        ppl = ws.get_metric(v.id, "perplexity", ds, "test")
        assert ppl is not None and ppl / base - 1 <= limit, (name, ppl, base)


def test_a_changed_source_rebuilds_its_variants_and_an_unchanged_one_does_not(variants):
    import yaml

    from stemma.build import build
    from stemma.spec import load_spec

    ws, spec = variants["ws"], variants["spec"]
    again = {e.node: e.action for e in build(ws, load_spec(spec), evaluate=False)}
    assert set(again.values()) == {"reused"}
    data = yaml.safe_load(spec.read_text())
    data["nodes"][SP]["config"]["steps"] = 30
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    events = {e.node: e.action for e in build(ws, load_spec(spec), evaluate=False, only=[f"{SP}/int8"])}
    assert events[SP] == "built" and events[f"{SP}/int8"] == "built"
    assert ws.resolve_version(f"{SP}/int8").row.parent_id == ws.resolve_version(SP).id


def test_footprints_are_measured_for_every_version(variants):
    from stemma.footprint import stored

    ws = variants["ws"]
    for node in ["master", SP, f"{SP}/int8", f"{SP}/int4"]:
        fp = stored(ws, ws.resolve_version(node).id)
        assert fp is not None, node
        assert fp.rss_generate_bytes >= fp.rss_load_bytes > 50 * 2**20  # a real process: Python + torch
        assert fp.tokens_per_s > 0 and fp.tokens_per_s_batched > 0 and fp.context == 64
        assert fp.machine["cores"] >= 1 and fp.machine["gemm_gflops"] > 0
    int8 = stored(ws, ws.resolve_version(f"{SP}/int8").id)
    full = stored(ws, ws.resolve_version(SP).id)
    assert int8.disk_bytes * 3 < full.disk_bytes


def test_llama_variants_build_load_and_show_in_the_tree(llama_variants):
    """Every variant of a Llama-layout node loads, is evaluated and measured, and structured pruning really shrinks
    the MLP and the KV groups."""
    from stemma.lineage import tree_rows

    ws = llama_variants["ws"]
    rows = {r.path: r for r in tree_rows(ws)}
    for name in ("int8", "int4", "lowrank", "sparse", "slim"):
        node = f"en/software/python/{name}"
        r = rows[node]
        assert r.status == "ok" and r.ppl_parent_split is not None, node
        assert ws.get_metric(r.version.id, "footprint.tokens_per_s", None, None), node
        ws.load_model(r.version.id)
    slim = ws.load_model(ws.resolve_version("en/software/python/slim").id)
    parent = ws.load_model(ws.resolve_version("en/software/python").id)
    assert slim.config.intermediate_size == parent.config.intermediate_size // 2
    assert slim.config.num_key_value_heads == parent.config.num_key_value_heads // 2
    assert slim.config.num_attention_heads == parent.config.num_attention_heads // 2
    assert slim.config.head_dim == parent.config.head_dim
