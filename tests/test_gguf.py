"""GGUF for every family (llama.cpp's ``gpt2``, ``llama`` and ``qwen2`` architectures): llama.cpp's greedy tokens
and logits equal stemma's, on the trained session trees and on tiny checkpoints of each supported variant."""

import json

import numpy as np
import pytest
import torch

from stemma.errors import StemmaError
from tests.conftest import save_hf_checkpoint

SP = "en/software/python"
PROMPTS = ["The grep command searches", "To install the package, run", "Copyright and licence",
           "def main():", "The options are as follows"]


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's first ``n`` greedy tokens after ``ids``."""
    llm.reset()
    got = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(t)
        if len(got) == n:
            break
    return got


def _stemma_greedy(model, ids: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)[0, len(ids):].tolist()


NEAR_TIE = 1e-2
"""Logit gap below which two fp32 implementations may rank the top two tokens differently (f16 weights, other
summation orders): a greedy run may part there, and only there."""


def assert_greedy_equal(llm, ref, ids: list[int], n: int, label: str) -> None:
    """llama.cpp's ``n`` greedy tokens equal stemma's, up to a near tie: where they first differ, llama.cpp must have
    taken stemma's runner-up with a gap under `NEAR_TIE`, and the comparison ends (the texts go separate ways)."""
    got, want = _llama_greedy(llm, ids, n), _stemma_greedy(ref, ids, n)
    if got == want:
        return
    i = next(k for k in range(n) if got[k] != want[k])
    with torch.no_grad():
        top = torch.topk(ref(torch.tensor([ids + want[:i]])).logits[0, -1].float(), 2)
    gap = float(top.values[0] - top.values[1])
    assert got[i] == int(top.indices[1]) and gap < NEAR_TIE, (
        f"{label}: token {i}: llama.cpp {got[i]}, stemma {want[i]} (top two {top.indices.tolist()}, gap {gap:.2e})")


def open_q8_0(path, **kw):
    """llama.cpp on a q8_0 ``path`` as stemma opens GGUF files (`stemma.footprint.open_gguf`: the CPU backend's
    repacked weight buffers off, which segfault on AMX CPUs at the first q8_0 decode)."""
    from stemma.footprint import open_gguf

    return open_gguf(path, **{"n_ctx": 64, **kw})


def _rounded_like_f16(model):
    """``model`` with every matrix rounded to f16, as an f16 GGUF holds it (vectors stay f32 there)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return model


def check_greedy(ws, node: str, tmp_path, gguf_type: str, rounded) -> None:
    """llama.cpp on ``node``'s GGUF tokenises each prompt as stemma does and its 16 greedy tokens equal stemma's
    (``rounded(model)``: stemma's model with the weights as the file holds them)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from stemma.pull import pull

    v = ws.resolve_version(node)
    out = pull(ws, v, tmp_path / "g", "gguf", gguf_type=gguf_type)
    assert json.loads((out / "stemma.json").read_text())["gguf_type"] == gguf_type
    tok = ws.tokenizer(v.row.tokenizer)
    ref = rounded(ws.load_model(v.id)) if gguf_type == "f16" else ws.load_model(v.id)
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=64, verbose=False, seed=0)
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        assert_greedy_equal(llm, ref, ids, 16, prompt)


def check_q8_0(ws, node: str, tmp_path, min_ratio: float) -> None:
    """llama.cpp's own quantizer makes one q8_0 file at least ``min_ratio`` times smaller than the f32 one, which
    loads and whose greedy tokens match stemma's fp32 model on most prompts."""
    pytest.importorskip("llama_cpp")
    from stemma.pull import pull

    v = ws.resolve_version(node)
    f32 = pull(ws, v, tmp_path / "f32", "gguf", gguf_type="f32")
    q8 = pull(ws, v, tmp_path / "q8", "gguf", gguf_type="q8_0")
    assert json.loads((q8 / "stemma.json").read_text())["gguf_type"] == "q8_0"
    assert sorted(p.name for p in q8.iterdir() if p.suffix == ".gguf") == ["model.gguf"]
    assert (f32 / "model.gguf").stat().st_size / (q8 / "model.gguf").stat().st_size > min_ratio
    tok = ws.tokenizer(v.row.tokenizer)
    ref = ws.load_model(v.id)
    llm = open_q8_0(q8 / "model.gguf")
    agree = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        agree += _llama_greedy(llm, ids, 8) == _stemma_greedy(ref, ids, 8)
    assert agree >= 3, f"q8_0 greedy output matched stemma's fp32 on only {agree} of {len(PROMPTS)} prompts"


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_cpp_greedy_output_equals_stemmas_on_the_gpt2_tree(variants, tmp_path, gguf_type):
    check_greedy(variants["ws"], "en/legal", tmp_path, gguf_type, lambda m: m.half().float())


def test_gguf_q8_0_by_llama_cpps_quantizer_loads_and_tracks_stemma_on_the_gpt2_tree(variants, tmp_path):
    check_q8_0(variants["ws"], "en/legal", tmp_path, 3.0)


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
@pytest.mark.parametrize("node", ["master", SP])
def test_llama_cpp_greedy_output_equals_stemmas_on_the_llama_tree(llama_copy, tmp_path, node, gguf_type):
    """The master (4 heads sharing 2 KV heads, tied head) and the adapter chain merged into it."""
    ws = llama_copy["ws"]
    ref = ws.load_model(ws.resolve_version(node).id)
    assert ref.config.model_type == "llama" and ref.config.num_key_value_heads == 2
    check_greedy(ws, node, tmp_path, gguf_type, _rounded_like_f16)


def test_llama_gguf_q8_0_loads_and_tracks_stemma(llama_copy, tmp_path):
    check_q8_0(llama_copy["ws"], SP, tmp_path, 2.5)


def test_gguf_refuses_architectures_it_cannot_express(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from stemma.pull import write_gguf

    m = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                 num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(StemmaError, match="no stemma model family"):
        write_gguf(m, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
"""llama3 RoPE scaling with a short original context, so most frequencies of a 48-token prompt are rescaled."""

CHECKPOINTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True}),
    "llama-linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama-llama3-rope": ("llama", {"rope_parameters": LLAMA3}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


def _checkpoint(tmp_path, model_type: str, scale: float = 5.0, **config):
    """A random tiny checkpoint with its matrices scaled by ``scale``, so attention and RoPE shape the logits (at
    the default init the logits are nearly uniform and a mislaid head would hardly show)."""
    from transformers import AutoModelForCausalLM

    from stemma.models.tokenizer import tokenizer_from_bytes

    d = save_hf_checkpoint(tmp_path / "ckpt", model_type, **config)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)
    return model, tokenizer_from_bytes((d / "tokenizer.json").read_bytes())


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_llama_cpp_logits_equal_transformers_for_each_layout(tmp_path, case):
    """f32 GGUF and an f32 KV cache: llama.cpp's logits at every position equal transformers' to float rounding
    (q/k rows in the wrong order for llama.cpp's RoPE, or a missing rope_freqs tensor, are off by ~2)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from stemma.pull import write_gguf

    model_type, config = CHECKPOINTS[case]
    model, tok = _checkpoint(tmp_path, model_type, **config)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    text = ("The grep command searches the named input files for lines containing a match to the given "
            "pattern. By default, grep prints the matching lines.")
    ids = tok.encode(text).ids[:48]
    assert len(ids) >= 32
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref).max() > 1.0  # logits that differ between tokens, not a flat row
    assert np.abs(got - ref).max() < 1e-4, case


def test_llama_cpp_greedy_output_equals_stemmas_on_a_trained_qwen2(tmp_path):
    """A Qwen2 checkpoint trained a few steps on the corpus: greedy text in llama.cpp's qwen2 architecture (f16
    file) equals transformers' on the same rounded weights."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from stemma.pull import write_gguf
    from tests.conftest import CORPUS

    model, tok = _checkpoint(tmp_path, "qwen2", scale=1.0)
    texts = [json.loads(line)["text"][:1500] for line in (CORPUS / "en-manpages.jsonl").open()][:40]
    rows = [ids[:64] for ids in (tok.encode(t).ids for t in texts) if len(ids) >= 64]
    data = torch.tensor(rows)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        batch = data[torch.randint(0, len(data), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    write_gguf(model, tok, tmp_path / "q.gguf", "f16")
    ref = _rounded_like_f16(model)
    llm = llama_cpp.Llama(str(tmp_path / "q.gguf"), n_ctx=64, verbose=False, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    for prompt in PROMPTS:
        assert_greedy_equal(llm, ref, tok.encode(prompt).ids, 16, prompt)


def test_gguf_refusals_are_one_line_and_leave_no_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from stemma.pull import write_gguf

    model, tok = _checkpoint(tmp_path, "qwen2", rope_parameters=LLAMA3)
    with pytest.raises(StemmaError, match="qwen2 architecture has no per-frequency RoPE factors") as e:
        write_gguf(model, tok, tmp_path / "m.gguf")
    assert "\n" not in str(e.value)
    model, _ = _checkpoint(tmp_path / "b", "llama")
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(StemmaError, match="byte-level BPE tokenizer with GPT-2's split"):
        write_gguf(model, words, tmp_path / "m.gguf")
    with pytest.raises(StemmaError, match="unknown GGUF type"):
        write_gguf(model, tok, tmp_path / "m.gguf", "q4_0")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name", ["int8", "int4", "lowrank", "sparse", "slim"])
def test_llama_variants_pull_as_plain_transformers_and_gguf(llama_variants, tmp_path, name):
    """`dense_model` expands every compressed Llama variant to a plain model with the variant's logits; its GGUF
    (f16 for quantised variants, as ``auto`` picks) loads in llama.cpp and generates."""
    from transformers import AutoModelForCausalLM

    from stemma.pull import pull

    ws = llama_variants["ws"]
    v = ws.resolve_version(f"{SP}/{name}")
    out = pull(ws, v, tmp_path / "hf", "hf")
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 500, (1, 24))
    ours = ws.load_model(v.id)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-4)
    llama_cpp = pytest.importorskip("llama_cpp")
    g = pull(ws, v, tmp_path / "g", "gguf")
    llm = llama_cpp.Llama(str(g / "model.gguf"), n_ctx=64, verbose=False, seed=0)
    prompt = ws.tokenizer(v.row.tokenizer).encode(PROMPTS[0]).ids
    assert len(_llama_greedy(llm, prompt, 8)) == 8


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("how", ["int8", "int4", "lowrank"])
def test_dense_model_expands_compressed_llama_modules(tmp_path, how, tied):
    """In memory, without the variant file format: every compressed module of a Llama model expands to the plain
    weights it computes with, and the head stays tied when the embedding's was."""
    from stemma.compress.lowrank import LowRankConfig, lowrank_model
    from stemma.compress.quantize import QuantizeConfig, quantize_model
    from stemma.pull import dense_model

    model, _ = _checkpoint(tmp_path, "llama", scale=1.0, tie_word_embeddings=tied)
    if how == "lowrank":
        assert lowrank_model(model, LowRankConfig(rank=8))
    else:
        assert quantize_model(model, QuantizeConfig(bits=8 if how == "int8" else 4))
    plain = dense_model(model)
    assert type(plain).__name__ == "LlamaForCausalLM" and plain is not model
    assert not any(type(m).__module__.startswith("stemma") for m in plain.modules())
    head, emb = plain.get_output_embeddings().weight, plain.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) == tied
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
