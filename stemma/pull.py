"""`stemma pull`: materialise a version (or the selector's choice) for a device.

Formats:
- ``hf``: a plain Hugging Face directory (adapter chain merged, a compressed variant expanded to dense fp32
  weights), loadable by ``AutoModelForCausalLM.from_pretrained`` with no stemma code.
- ``safetensors``: the version's own stored form: a compressed variant stays compressed (``variant.json`` +
  ``variant.safetensors``, loaded by `stemma.compress.layers.load_variant`); other versions are merged.
- ``gguf``: one ``model.gguf`` for llama.cpp (GPT-2 architecture), f32, or f16 for a quantised variant; ``q8_0``
  is made from the f32 file by llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python),
  because q8_0 tensors written with the ``gguf`` package crash llama-cpp-python 0.3.36 at decode here.

Every format carries the tokenizer, ``stemma.json`` (content-addressed lineage) and a model card (``README.md``)
whose metadata names the base model, the Hugging Face ``base_model_relation``, datasets, licence and metrics.
The directory is written beside its destination and renamed into place: on any error nothing is left in DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import StemmaError
from .workspace import VersionInfo, Workspace

FORMATS = ("hf", "safetensors", "gguf")
GGUF_TYPES = ("auto", "f32", "f16", "q8_0")
# Hugging Face's base_model_relation words (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
HF_RELATIONS = {"adapter": "adapter", "finetune": "finetune", "distill": "finetune", "quantized": "quantized",
                "pruned": "finetune", "lowrank": "finetune", "merge": "merge", "update": "finetune"}


def dense_model(model: nn.Module) -> nn.Module:
    """A plain transformers model with the same function as ``model`` (compressed modules expanded to fp32)."""
    from transformers import AutoModelForCausalLM

    from .compress.layers import LowRankLinear, QuantEmbedding, QuantLinear, TiedQuantHead

    special = (QuantLinear, QuantEmbedding, TiedQuantHead, LowRankLinear)
    if not any(isinstance(m, special) for m in model.modules()):
        return model
    plain = AutoModelForCausalLM.from_config(model.config)
    state: dict[str, torch.Tensor] = {}
    tables = {id(m.table) for m in model.modules() if isinstance(m, QuantEmbedding)}
    for name, m in model.named_modules():
        if id(m) in tables:
            continue  # an embedding's table, expanded with the embedding
        if isinstance(m, QuantEmbedding):
            state[f"{name}.weight"] = m.table.dequantized()
        elif isinstance(m, QuantLinear | LowRankLinear):
            w = m.dequantized() if isinstance(m, QuantLinear) else m.dense()  # [out, in]
            target = plain.get_submodule(name)
            state[f"{name}.weight"] = w if isinstance(target, nn.Linear) else w.t().contiguous()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().float()
    for k, t in model.state_dict().items():
        if not any(k.startswith(n + ".") for n, m in model.named_modules() if isinstance(m, special)):
            state[k] = t
    missing, unexpected = plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    bad = [k for k in missing if not k.startswith("lm_head")] + list(unexpected)
    if bad:
        raise StemmaError(f"cannot expand the variant to a plain model: {', '.join(bad[:3])}")
    return plain.eval()


def model_card(ws: Workspace, v: VersionInfo, fmt: str, extra: dict | None = None) -> str:
    """A Hugging Face model card: YAML metadata (base model, relation, datasets, licence, metrics) and a summary."""
    import yaml

    chain = ws.chain(v.id)
    parent = chain[-2] if len(chain) > 1 else None
    ds_rows = {}
    for c in chain:
        for role, d in ws.version_datasets(c.id).items():
            if role == "train":
                ds_rows[d] = ws.resolve_dataset(d)
    licences = sorted({r.license for r in ds_rows.values() if r.license})
    metrics = []
    for m in ws.metrics_of(v.id):
        if m.dataset_id is None:
            metrics.append({"name": m.name, "type": m.name, "value": round(m.value, 4)})
        else:
            name = ds_rows[m.dataset_id].name if m.dataset_id in ds_rows else m.dataset_id[:12]
            metrics.append({"name": f"perplexity on {name} ({m.split})", "type": m.name, "value": round(m.value, 4),
                            "dataset": {"name": name, "type": f"stemma:{m.dataset_id}", "split": m.split}})
    meta = {
        "library_name": "gguf" if fmt == "gguf" else "transformers",
        "license": "other" if not licences else ("other" if len(licences) > 1 else licences[0].split()[0].lower()),
        "license_details": "; ".join(licences) or "not recorded",
        "tags": ["stemma", v.row.node_path.split("/")[0], v.row.relation],
        "datasets": [f"stemma:{d}" for d in ds_rows],
        "model-index": [{"name": v.row.node_path, "results": [
            {"task": {"type": "text-generation"}, "metrics": metrics}]}],
    }
    if parent is not None:
        meta["base_model"] = f"stemma:{parent.id}"
        meta["base_model_relation"] = HF_RELATIONS.get(v.row.relation, "finetune")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {v.row.node_path} ({v.short})", "",
             f"A `{v.row.method}` version ({v.row.relation}) in a stemma tree, exported as `{fmt}`.", "",
             "Lineage (content-addressed):", ""]
    for c in chain:
        lines.append(f"- `{c.row.node_path}` `{c.id}` ({c.row.relation}, {c.row.method})")
    lines += ["", "Datasets:", ""]
    for d, r in ds_rows.items():
        lines.append(f"- `{r.name}` `{d}`: {r.n_docs} documents, licence {r.license or 'not recorded'}")
    variant = v.manifest.get("architecture", {}).get("variant")
    if variant:
        lines += ["", f"Compression: `{json.dumps(variant, sort_keys=True)}`"]
    for k, val in (extra or {}).items():
        lines += ["", f"{k}: {val}"]
    return "\n".join(lines) + "\n"


def write_gguf(model: nn.Module, tok, path: Path, out_type: str = "f32") -> None:
    """Write a GPT-2 model as GGUF, in llama.cpp's GPT-2 layout (what its ``convert_hf_to_gguf.py`` writes).

    The tensor names and metadata keys follow the ``gguf`` package's constants for ``gpt2``; Conv1D weights are
    transposed to [out, in] as the converter does, and the tied output head is written out explicitly.
    """
    import gguf
    import numpy as np

    cfg = model.config
    if getattr(cfg, "model_type", None) != "gpt2":
        raise StemmaError(f"GGUF export supports the GPT-2 architecture stemma trains, not {cfg.model_type!r}")
    if out_type not in ("f32", "f16"):
        raise StemmaError(f"unknown GGUF type {out_type!r} (one of f32, f16)")
    n_inner = cfg.n_inner or 4 * cfg.n_embd
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("stemma")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(n_inner)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[out_type]
    w.add_file_type(ftype)
    # Tokenizer: byte-level BPE with GPT-2's split, which llama.cpp calls pre-tokenizer "gpt-2".
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if len(tokens) != cfg.vocab_size:
        tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    w.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    def put(name: str, t: torch.Tensor) -> None:
        a = t.detach().float().contiguous().numpy()
        if a.ndim == 2 and out_type == "f16" and name != "position_embd.weight":
            w.add_tensor(name, a.astype(np.float16))
            return
        w.add_tensor(name, a.astype(np.float32))

    tr = model.transformer
    put("token_embd.weight", tr.wte.weight)
    put("position_embd.weight", tr.wpe.weight)
    for i, b in enumerate(tr.h):
        put(f"blk.{i}.attn_norm.weight", b.ln_1.weight)
        put(f"blk.{i}.attn_norm.bias", b.ln_1.bias)
        put(f"blk.{i}.attn_qkv.weight", b.attn.c_attn.weight.t())
        put(f"blk.{i}.attn_qkv.bias", b.attn.c_attn.bias)
        put(f"blk.{i}.attn_output.weight", b.attn.c_proj.weight.t())
        put(f"blk.{i}.attn_output.bias", b.attn.c_proj.bias)
        put(f"blk.{i}.ffn_norm.weight", b.ln_2.weight)
        put(f"blk.{i}.ffn_norm.bias", b.ln_2.bias)
        put(f"blk.{i}.ffn_up.weight", b.mlp.c_fc.weight.t())
        put(f"blk.{i}.ffn_up.bias", b.mlp.c_fc.bias)
        put(f"blk.{i}.ffn_down.weight", b.mlp.c_proj.weight.t())
        put(f"blk.{i}.ffn_down.bias", b.mlp.c_proj.bias)
    put("output_norm.weight", tr.ln_f.weight)
    put("output_norm.bias", tr.ln_f.bias)
    put("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: Path, dst: Path, kind: str = "q8_0") -> None:
    """Quantise a GGUF file with llama.cpp's own quantizer (the ``gguf`` extra: llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        raise StemmaError(f"GGUF {kind} needs llama.cpp's quantizer: pip install 'stemma[gguf]'") from None
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise StemmaError(f"llama.cpp could not quantise the GGUF to {kind} (code {rc})")


def pull(ws: Workspace, version: VersionInfo, out: Path, fmt: str = "hf", gguf_type: str = "auto",
         force: bool = False, why: str | None = None) -> Path:
    """Write ``version`` to ``out`` in ``fmt``; see the module docstring. Returns the directory."""
    from .models.tokenizer import hf_tokenizer

    if fmt not in FORMATS:
        raise StemmaError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if gguf_type not in GGUF_TYPES:
        raise StemmaError(f"unknown GGUF type {gguf_type!r} (one of {', '.join(GGUF_TYPES)})")
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise StemmaError(f"{out} exists and is not empty; choose another --out or pass --force")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise StemmaError(f"cannot write to {out.parent}: {e.strerror}") from None
    try:
        tok = ws.tokenizer(v_tok := version.row.tokenizer)
        model = ws.load_model(version.id)
        variant = version.manifest.get("architecture", {}).get("variant") or {}
        files: dict[str, str] = {}
        if fmt == "safetensors" and "variant.json" in version.manifest["files"]:
            for name, digest in version.manifest["files"].items():
                shutil.copyfile(ws.store.verified_path(digest), tmp / name)
        elif fmt in ("hf", "safetensors"):
            dense_model(model).save_pretrained(tmp, safe_serialization=True)
        else:
            plain = dense_model(model)
            kind = gguf_type
            if kind == "auto":
                kind = "f16" if variant.get("method") == "quantized" else "f32"
            if kind == "q8_0":
                write_gguf(plain, tok, tmp / "model-f32.gguf", "f32")
                quantize_gguf(tmp / "model-f32.gguf", tmp / "model.gguf", kind)
                (tmp / "model-f32.gguf").unlink()
            else:
                write_gguf(plain, tok, tmp / "model.gguf", kind)
            files["gguf_type"] = kind
        hf_tokenizer(tok).save_pretrained(tmp)
        chain = ws.chain(version.id)
        lineage = {"version": version.id, "node": version.row.node_path, "format": fmt, "tokenizer": v_tok,
                   "chain": [{"node": c.row.node_path, "version": c.id, "relation": c.row.relation} for c in chain],
                   **({"selected_because": why} if why else {}), **files}
        (tmp / "stemma.json").write_text(json.dumps(lineage, indent=2))
        (tmp / "README.md").write_text(model_card(ws, version, fmt, {"Selected because": why} if why else None))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
