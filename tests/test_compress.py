"""Compression methods: the layers against dense references, the variant format and structured pruning on small
models of each family, and the variants built as children of a node of each family's session tree."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from stemma.compress.layers import (
    LowRankLinear,
    QuantEmbedding,
    QuantLinear,
    TiedQuantHead,
    dequantize_int4,
    load_variant,
    pack_sparse,
    quantize_int4,
    quantize_int8,
    rank_for_energy,
    save_variant,
    unpack_sparse,
)
from stemma.errors import SpecError, StemmaError
from stemma.models.arch import count_params

SP = "en/software/python"
NAMES = ("int8", "int4", "lowrank", "sparse", "slim")
"""The variants conftest's VARIANTS adds under `SP`."""


def _conv(n_in=64, n_out=96, seed=0):
    torch.manual_seed(seed)
    m = Conv1D(n_out, n_in)
    nn.init.normal_(m.weight, std=0.05)
    nn.init.normal_(m.bias, std=0.01)
    return m


def _linear(n_in=64, n_out=96, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(n_in, n_out)
    nn.init.normal_(m.weight, std=0.05)
    nn.init.normal_(m.bias, std=0.01)
    return m


LAYERS = {"conv1d": _conv, "linear": _linear}
"""GPT-2's ``Conv1D`` (weight [in, out]) and the Llama layout's ``nn.Linear`` (weight [out, in])."""


def _tiny(model_type: str, tied: bool, seed: int = 0, **overrides):
    """A random tiny causal LM of ``model_type`` (gpt2, llama, mistral, qwen2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32)
    else:
        cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, vocab_size=100, tie_word_embeddings=tied, **cfg))
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload_variant(files: dict[str, bytes], tmp_path):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return load_variant({name: tmp_path / name for name in files})


FAMILY_MODELS = [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False), ("mistral", False),
                 ("qwen2", True)]


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


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_forward_equals_dense_layer_of_its_dequantised_weight(bits, layer):
    m = LAYERS[layer]()
    q = QuantLinear.from_linear(m, bits, group_size=32)
    x = torch.randn(3, 5, 64)
    ref = x @ q.dequantized().t() + m.bias
    assert torch.allclose(q(x), ref, atol=1e-4)
    # ... and close to the original layer
    assert (q(x) - m(x)).norm() / m(x).norm() < (0.01 if bits == 8 else 0.15)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lowrank_at_full_rank_is_exact_and_energy_picks_the_rank(layer):
    m = LAYERS[layer](32, 48)
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


# ---------------------------------------------------------------------------------------------- variant format
@pytest.mark.parametrize("model_type, tied", FAMILY_MODELS)
@pytest.mark.parametrize("kind", ["int8", "int4", "lowrank", "sparse"])
def test_variant_files_reload_to_the_same_model_in_every_family(tmp_path, model_type, tied, kind):
    """Compressed in memory, saved, loaded from the files on ``meta``: the same logits, RoPE buffers recomputed,
    a tied head kept tied to the quantised table and an untied one quantised as a layer of its own."""
    from stemma.compress.lowrank import LowRankConfig, lowrank_model
    from stemma.compress.prune import prune_unstructured
    from stemma.compress.quantize import QuantizeConfig, quantize_model

    model, packed = _tiny(model_type, tied), None
    ref = copy.deepcopy(model)
    if kind in ("int8", "int4"):
        modules = quantize_model(model, QuantizeConfig(bits=8 if kind == "int8" else 4))
    elif kind == "lowrank":
        modules = lowrank_model(model, LowRankConfig(rank=8, include_head=True))
    else:
        modules, packed = {}, {}
        for name in prune_unstructured(model, 0.5):
            w = model.get_submodule(name).weight.data
            modules[name] = {"kind": "sparse", "shape": list(w.shape)}
            packed.update({f"{name}.weight.{k}": t for k, t in pack_sparse(w, torch.float32).items()})
    files = save_variant(model, {"method": kind}, modules, packed)
    loaded = _reload_variant(files, tmp_path)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b, r = _logits(model, ids), _logits(loaded, ids), _logits(ref, ids)
    assert torch.allclose(a, b, atol=1e-5)
    assert (b - r).norm() / r.norm() < {"int8": 0.03, "int4": 0.3, "lowrank": 1.0, "sparse": 0.5}[kind]
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    head = loaded.get_output_embeddings()
    if kind in ("int8", "int4"):
        assert isinstance(loaded.get_input_embeddings(), QuantEmbedding)
        assert isinstance(head, TiedQuantHead if tied else QuantLinear)
    if kind == "lowrank":
        # The output head is factorised on request only when untied: a tied one stays the embedding's table.
        assert isinstance(head, nn.Linear if tied else LowRankLinear)
    if kind == "sparse" and tied:
        assert head.weight is loaded.get_input_embeddings().weight
    assert "n_ctx" in loaded.config.to_dict() if model_type == "gpt2" else "n_ctx" not in loaded.config.to_dict()


# ---------------------------------------------------------------------------------------------- structured pruning
def _zeroed_reference(ref, pruned):
    """``ref`` with what pruning removed zeroed instead: the down-projection columns of removed neurons and the
    output-projection columns of removed query heads (their only way into the residual stream)."""
    for lo, lr in zip(pruned.model.layers, ref.model.layers):
        for small, big, out in ((lo.mlp.gate_proj, lr.mlp.gate_proj, lr.mlp.down_proj),
                                (lo.self_attn.q_proj, lr.self_attn.q_proj, lr.self_attn.o_proj)):
            kept = torch.cdist(small.weight, big.weight).argmin(dim=1)  # each kept row is an exact copy
            mask = torch.zeros(big.weight.shape[0])
            mask[kept] = 1
            out.weight.data.mul_(mask[None, :])
    return ref


@pytest.mark.parametrize("model_type, tied", [("llama", True), ("llama", False), ("mistral", False),
                                              ("qwen2", True)])
def test_llama_structured_pruning_removes_neurons_and_kv_groups_for_real(tmp_path, model_type, tied):
    from stemma.compress.prune import prune_structured
    from stemma.models.io import load_hf_dir, save_model_files

    model = _tiny(model_type, tied, num_attention_heads=8, num_key_value_heads=4)
    ref = copy.deepcopy(model)
    masks = prune_structured(model, neurons=0.5, heads=0.5)
    c = model.config
    assert masks == {}  # nothing zeroed: everything removed is gone
    assert (c.intermediate_size, c.num_key_value_heads, c.num_attention_heads, c.head_dim) == (48, 2, 4, 8)
    assert c.hidden_size == 64
    at = model.model.layers[0].self_attn
    assert (at.q_proj.out_features, at.k_proj.out_features, at.v_proj.out_features, at.o_proj.in_features) == (
        32, 16, 16, 32)
    assert count_params(model) < count_params(ref)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    out = _logits(model, ids)
    assert torch.allclose(out, _logits(_zeroed_reference(ref, model), ids), atol=1e-5)
    for name, data in save_model_files(model).items():
        (tmp_path / name).write_bytes(data)
    again = load_hf_dir(tmp_path)
    assert again.config.num_key_value_heads == 2 and again.config.intermediate_size == 48
    assert torch.allclose(_logits(again, ids), out, atol=1e-6)
    assert (again.get_output_embeddings().weight is again.get_input_embeddings().weight) == tied


def test_gpt2_structured_pruning_removes_neurons_and_zeroes_heads():
    from stemma.compress.prune import prune_structured

    model = _tiny("gpt2", True)
    masks = prune_structured(model, neurons=0.5, heads=0.5)
    assert model.config.n_inner == 128 and model.transformer.h[0].mlp.c_fc.weight.shape == (64, 128)
    w = model.transformer.h[0].attn.c_proj.weight.reshape(4, 16, 64)
    assert int((w.abs().sum(dim=(1, 2)) == 0).sum()) == 2  # two of four heads zeroed, masks keep them zero
    assert set(masks) >= {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"}


@pytest.mark.parametrize("model_type, overrides, heads, msg", [
    ("llama", {"num_key_value_heads": 1}, 0.5, "llama: heads=0.5 of 1 KV groups removes none"),
    ("qwen2", {}, 0.25, "qwen2: heads=0.25 of 2 KV groups removes none"),
    ("gpt2", {"n_head": 2}, 0.25, "gpt2: heads=0.25 of 2 attention heads zeroes none"),
])
def test_structured_pruning_refuses_what_it_cannot_remove_in_one_line(model_type, overrides, heads, msg):
    from stemma.compress.prune import prune_structured
    from stemma.models.families import UnsupportedArchitectureError

    model = _tiny(model_type, True, **overrides)
    with pytest.raises(UnsupportedArchitectureError, match=msg) as e:
        prune_structured(model, neurons=0.25, heads=heads)
    assert "\n" not in str(e.value)


def test_a_family_without_structured_pruning_refuses_in_one_line():
    from stemma.models.families import Family, UnsupportedArchitectureError

    class Bare(Family):
        name = "bare"

    with pytest.raises(UnsupportedArchitectureError, match="bare: structured pruning is not implemented") as e:
        Bare().prune_structured(None, 0.5, 0.0)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- built variants
@pytest.fixture(params=["gpt2", "llama"])
def family_variants(request):
    """A writable copy of each family's variant tree in turn (conftest: `variants`, `llama_variants`)."""
    return request.getfixturevalue("variants" if request.param == "gpt2" else "llama_variants")


QUANT_MODULES = {"gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"),
                 "llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj")}
"""An attention and an MLP projection of each family (checked for integer weights)."""


@pytest.mark.parametrize("name, tol", [("int8", 0.02), ("int4", 0.25), ("lowrank", 0.6), ("sparse", 0.6),
                                       ("slim", 1.0)])
def test_variants_load_standalone_and_stay_close_to_their_parent(family_variants, name, tol):
    ws = family_variants["ws"]
    v = ws.resolve_version(f"{SP}/{name}")
    parent = ws.resolve_version(SP)
    assert v.row.parent_id == parent.id
    assert v.row.relation in ("quantized", "lowrank", "pruned")
    model, ref = ws.load_model(v.id), ws.load_model(parent.id)
    assert model.config.model_type == ref.config.model_type
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    a, b = _logits(model, ids), _logits(ref, ids)
    assert (a - b).norm() / b.norm() < tol
    # Stored as safetensors only, smaller than the merged parent in fp32.
    assert all(n.endswith((".json", ".safetensors")) for n in v.manifest["files"])
    fp32 = count_params(ref) * 4
    assert v.row.bytes < fp32


def test_quantised_models_hold_integer_weights_in_memory(family_variants):
    ws = family_variants["ws"]
    attn, mlp = QUANT_MODULES[family_variants["arch"]]
    m8 = ws.load_model(ws.resolve_version(f"{SP}/int8").id)
    m4 = ws.load_model(ws.resolve_version(f"{SP}/int4").id)
    assert m8.get_submodule(attn).qweight.dtype == torch.int8
    assert m4.get_submodule(mlp).qweight.dtype == torch.uint8
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in m8.parameters())
    out = m8.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_variant_perplexity_is_evaluated_on_the_parents_split(family_variants):
    ws = family_variants["ws"]
    parent = ws.resolve_version(SP)
    ds = ws.version_datasets(parent.id)["train"]
    base = ws.get_metric(parent.id, "perplexity", ds, "test")
    for name, limit in [("int8", 0.02), ("int4", 0.10)]:
        v = ws.resolve_version(f"{SP}/{name}")
        ppl = ws.get_metric(v.id, "perplexity", ds, "test")
        assert ppl is not None and ppl / base - 1 <= limit, (name, ppl, base)


def test_every_variant_shows_its_perplexity_and_footprint_in_the_tree(family_variants):
    from stemma.lineage import tree_rows

    ws = family_variants["ws"]
    rows = {r.path: r for r in tree_rows(ws)}
    parent = rows[SP]
    for name in NAMES:
        r = rows[f"{SP}/{name}"]
        assert r.status == "ok" and r.layer == "device", name
        assert r.ppl_parent_split is not None and r.parent_ppl_parent_split is not None, name
        assert r.parent_ppl_parent_split == pytest.approx(parent.ppl_own), name  # the parent on its own split
        assert r.forgetting is not None, name
        assert ws.get_metric(r.version.id, "footprint.tokens_per_s", None, None), name


def test_llama_structured_variant_shrinks_the_mlp_and_kv_groups(llama_variants):
    ws = llama_variants["ws"]
    v = ws.resolve_version(f"{SP}/slim")
    slim, parent = ws.load_model(v.id), ws.load_model(ws.resolve_version(SP).id)
    c, p = slim.config, parent.config
    assert c.intermediate_size == p.intermediate_size // 2
    assert (c.num_key_value_heads, c.num_attention_heads) == (p.num_key_value_heads // 2, p.num_attention_heads // 2)
    assert c.head_dim == p.head_dim and c.hidden_size == p.hidden_size
    at = slim.model.layers[0].self_attn
    assert at.k_proj.out_features == c.num_key_value_heads * c.head_dim
    assert at.o_proj.in_features == c.num_attention_heads * c.head_dim
    # The manifest describes the pruned shape, and the recovery fine-tune ran.
    arch = v.manifest["architecture"]
    assert (arch["n_inner"], arch["n_kv_head"], arch["n_head"]) == (
        c.intermediate_size, c.num_key_value_heads, c.num_attention_heads)
    assert v.manifest["train"]["steps"] == 4
    assert count_params(slim) < count_params(parent)


def test_structured_pruning_of_too_few_kv_groups_refuses_the_build_in_one_line(llama_copy):
    import yaml

    from stemma.build import build
    from stemma.spec import load_spec

    spec = llama_copy["spec"]
    data = yaml.safe_load(spec.read_text())
    data["nodes"][f"{SP}/thin"] = {"method": "pruned", "parent": SP, "layer": "device",
                                  "config": {"mode": "structured", "neurons": 0.25, "heads": 0.25}}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(StemmaError, match="heads=0.25 of 2 KV groups removes none") as e:
        build(llama_copy["ws"], load_spec(spec), evaluate=False, only=[f"{SP}/thin"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_changed_source_rebuilds_its_variants_and_an_unchanged_one_does_not(request, family):
    import yaml

    from stemma.build import build
    from stemma.spec import load_spec

    tree = request.getfixturevalue("variants" if family == "gpt2" else "llama_variants")
    ws, spec = tree["ws"], tree["spec"]
    again = {e.node: e.action for e in build(ws, load_spec(spec), evaluate=False)}
    assert set(again.values()) == {"reused"}
    data = yaml.safe_load(spec.read_text())
    data["nodes"][SP]["config"]["steps"] = 30
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    events = {e.node: e.action for e in build(ws, load_spec(spec), evaluate=False, only=[f"{SP}/int8"])}
    assert events[SP] == "built" and events[f"{SP}/int8"] == "built"
    assert ws.resolve_version(f"{SP}/int8").row.parent_id == ws.resolve_version(SP).id


def test_footprints_are_measured_for_every_version(family_variants):
    from stemma.footprint import stored

    ws = family_variants["ws"]
    for node in ["master", SP, *(f"{SP}/{n}" for n in NAMES)]:
        fp = stored(ws, ws.resolve_version(node).id)
        assert fp is not None, node
        assert fp.rss_generate_bytes >= fp.rss_load_bytes > 50 * 2**20  # a real process: Python + torch
        assert fp.tokens_per_s > 0 and fp.tokens_per_s_batched > 0 and fp.context == 64
        assert fp.machine["cores"] >= 1 and fp.machine["gemm_gflops"] > 0
    int8 = stored(ws, ws.resolve_version(f"{SP}/int8").id)
    full = stored(ws, ws.resolve_version(SP).id)
    assert int8.disk_bytes * 3 < full.disk_bytes
