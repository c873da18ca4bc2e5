"""`stemma pull`: materialise a version (or the selector's choice) for a device.

Formats:
- ``hf``: a plain Hugging Face directory (adapter chain merged, a compressed variant expanded to dense fp32
  weights), loadable by ``AutoModelForCausalLM.from_pretrained`` with no stemma code.
- ``safetensors``: the version's own stored form: a compressed variant stays compressed (``variant.json`` +
  ``variant.safetensors``, loaded by `stemma.compress.layers.load_variant`); other versions are merged.
- ``gguf``: one ``model.gguf`` for llama.cpp in its family's layout (``gpt2``, ``llama``, ``qwen2``), f32, or f16
  for a quantised variant; ``q8_0`` is made from the f32 file by llama.cpp's own quantizer
  (``llama_model_quantize`` through llama-cpp-python). On a CPU with AMX, llama-cpp-python 0.3.36 repacks q8_0
  weights for AMX and segfaults at the first decode, whichever tool wrote the file (llama.cpp issue #20824);
  loading with the model parameter ``use_extra_bufts`` off avoids it.

Every format carries the tokenizer, ``stemma.json`` (content-addressed lineage) and a model card (``README.md``)
whose metadata names the base model, the Hugging Face ``base_model_relation``, datasets, licence and metrics.
The directory is written beside its destination and renamed into place: on any error nothing is left in DIR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import StemmaError
from .footprint import GGUF_FORMATS
from .store import check_out_dir, staged_dir
from .workspace import VersionInfo, Workspace

FORMATS = ("hf", "safetensors", "gguf")
GGUF_TYPES = ("auto", *GGUF_FORMATS)
"""``--gguf-type``: ``auto`` (f16 for a quantised variant, else f32) or one of `stemma.footprint.GGUF_FORMATS`."""


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
    """The Hugging Face model card of a pulled version: the release's card (`stemma.release.card`, the same facts),
    unsigned, under the licence the lineage's obligations imply (``other`` when they imply none)."""
    from .licenses import licensing
    from .release import card
    from .release.facts import gather
    from .release.make import Verdict

    lic = licensing(ws, v.id)
    facts = gather(ws, v, fmt, Verdict(lic.implied, (), lic, ()), signing_key=None)
    lines = [card.render(facts, card.metadata(facts)).rstrip("\n")]
    variant = v.manifest.get("architecture", {}).get("variant")
    if variant:
        lines += ["", f"Compression: `{json.dumps(variant, sort_keys=True)}`"]
    for k, val in (extra or {}).items():
        lines += ["", f"{k}: {val}"]
    return "\n".join(lines) + "\n"


# Tensors llama.cpp's converter keeps in f32 whatever the file type (besides every 1-D tensor).
GGUF_F32_TENSORS = ("position_embd.weight",)


def check_gguf_tokenizer(tok) -> None:
    """Refuse a tokenizer llama.cpp's pre-tokenizer ``gpt-2`` would split differently (one line naming it)."""
    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        got = f"{model.get('type')} model, {pre.get('type')} pre-tokenizer"
        raise StemmaError(f"GGUF export needs a byte-level BPE tokenizer with GPT-2's split (llama.cpp's "
                          f"pre-tokenizer gpt-2); this version's tokenizer has a {got}")


def write_gguf(model: nn.Module, tok, path: Path, out_type: str = "f32") -> None:
    """Write a model as GGUF in llama.cpp's layout for its family (what llama.cpp's ``convert_hf_to_gguf.py``
    writes).

    The shared part is here: file type, the byte-level BPE tokenizer (pre-tokenizer ``gpt-2``), bos/eos, and the
    precision of each tensor; the family (`stemma.models.families.Family.write_gguf`) adds the architecture's
    metadata and tensors. Everything the file cannot express is refused before it is created; a failure while
    writing removes it.

    Args:
        model: a plain transformers model (`dense_model` expands compressed variants).
        tok: the version's ``tokenizers.Tokenizer``.
        path: the file to write.
        out_type: ``f32``, or ``f16`` for every matrix (1-D tensors and position embeddings stay f32).
    """
    import gguf
    import numpy as np

    from .models import families

    cfg = model.config
    fam = families.checked(cfg)
    arch = fam.gguf_architecture(cfg)
    if out_type not in ("f32", "f16"):
        raise StemmaError(f"unknown GGUF type {out_type!r} (one of f32, f16)")
    check_gguf_tokenizer(tok)
    w = gguf.GGUFWriter(str(path), arch)
    try:
        w.add_name("stemma")
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[out_type])
        vocab = tok.get_vocab(with_added_tokens=True)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if len(tokens) != cfg.vocab_size:
            tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
        specials = {t.content for t in tok.get_added_tokens_decoder().values()}
        merges = json.loads(tok.to_str())["model"]["merges"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        eos = _first_id(cfg.eos_token_id, 0)
        w.add_bos_token_id(_first_id(cfg.bos_token_id, eos))
        w.add_eos_token_id(eos)
        # stemma's models are trained without a leading BOS; llama.cpp would otherwise add one to every prompt.
        w.add_add_bos_token(False)

        def put(name: str, t: torch.Tensor) -> None:
            a = t.detach().float().contiguous().numpy()
            half = out_type == "f16" and a.ndim == 2 and name not in GGUF_F32_TENSORS
            w.add_tensor(name, a.astype(np.float16 if half else np.float32))

        fam.write_gguf(model, w, put)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except BaseException:
        w.close()
        Path(path).unlink(missing_ok=True)
        raise
    w.close()


def _first_id(v, default: int) -> int:
    """A config's token id, which some configs give as a list (the first one is the one llama.cpp takes)."""
    if isinstance(v, list | tuple):
        v = v[0] if v else None
    return default if v is None else int(v)


def quantize_gguf(src: Path, dst: Path, kind: str = "q8_0") -> None:
    """Quantise a GGUF file with llama.cpp's own quantizer (the ``gguf`` extra: llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        raise StemmaError(f"GGUF {kind} needs llama.cpp's quantizer: pip install 'stemma[gguf]'") from None
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # its per-tensor log; the code below says whether it failed
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise StemmaError(f"llama.cpp could not quantise the GGUF to {kind} (code {rc})")


def write_gguf_types(ws: Workspace, version: VersionInfo, dirpath: Path, kinds=("f32",)) -> dict[str, Path]:
    """Write the version as ``model-<kind>.gguf`` in ``dirpath`` for each of ``kinds`` (`GGUF_FORMATS`: f32, f16,
    q8_0; q8_0 by llama.cpp's quantizer from an f32 file, removed after unless f32 is asked too); the model is
    loaded once. Returns the files by kind."""
    unknown = [k for k in kinds if k not in GGUF_FORMATS]
    if unknown:
        raise StemmaError(f"unknown GGUF type {unknown[0]!r} (one of {', '.join(GGUF_FORMATS)})")
    plain = dense_model(ws.load_model(version.id))
    tok = ws.tokenizer(version.row.tokenizer)
    files: dict[str, Path] = {}
    for kind in GGUF_FORMATS:
        if kind in kinds or (kind == "f32" and "q8_0" in kinds):
            path = dirpath / f"model-{kind}.gguf"
            if kind == "q8_0":
                quantize_gguf(files["f32"], path, kind)
            else:
                write_gguf(plain, tok, path, kind)
            files[kind] = path
    if "f32" in files and "f32" not in kinds:
        files.pop("f32").unlink()
    return {k: files[k] for k in kinds}


def pull(ws: Workspace, version: VersionInfo, out: Path, fmt: str = "hf", gguf_type: str = "auto",
         force: bool = False, why: str | None = None) -> Path:
    """Write ``version`` to ``out`` in ``fmt``; see the module docstring. Returns the directory."""
    from .models.tokenizer import hf_tokenizer

    if fmt not in FORMATS:
        raise StemmaError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if gguf_type not in GGUF_TYPES:
        raise StemmaError(f"unknown GGUF type {gguf_type!r} (one of {', '.join(GGUF_TYPES)})")
    out = check_out_dir(out, force)
    with staged_dir(out, force) as tmp:
        tok = ws.tokenizer(v_tok := version.row.tokenizer)
        variant = version.manifest.get("architecture", {}).get("variant") or {}
        files: dict[str, str] = {}
        if fmt == "safetensors" and "variant.json" in version.manifest["files"]:
            for name, digest in version.manifest["files"].items():
                shutil.copyfile(ws.store.verified_path(digest), tmp / name)
        elif fmt in ("hf", "safetensors"):
            dense_model(ws.load_model(version.id)).save_pretrained(tmp, safe_serialization=True)
        else:
            kind = gguf_type
            if kind == "auto":
                kind = "f16" if variant.get("method") == "quantized" else "f32"
            write_gguf_types(ws, version, tmp, (kind,))[kind].rename(tmp / "model.gguf")
            files["gguf_type"] = kind
        hf_tokenizer(tok).save_pretrained(tmp)
        chain = ws.chain(version.id)
        lineage = {"version": version.id, "node": version.row.node_path, "format": fmt, "tokenizer": v_tok,
                   "chain": [{"node": c.row.node_path, "version": c.id, "relation": c.row.relation} for c in chain],
                   **({"selected_because": why} if why else {}), **files}
        (tmp / "stemma.json").write_text(json.dumps(lineage, indent=2))
        (tmp / "README.md").write_text(model_card(ws, version, fmt, {"Selected because": why} if why else None))
    return out
