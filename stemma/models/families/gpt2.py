"""GPT-2 (transformers ``GPT2LMHeadModel``): learned positions, LayerNorm, GELU MLP, fused ``c_attn``,
``Conv1D`` projections stored ``[in, out]``, tied output head."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from . import register
from . import serving as sv
from .base import ArchConfig, Family, UnsupportedArchitectureError


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    lora_targets = ("c_attn", "c_proj", "c_fc")
    lora_fan_in_fan_out = True
    gguf_arch = "gpt2"

    # ------------------------------------------------------------------ configs
    def hf_config(self, arch: ArchConfig, vocab_size: int, eos_token_id: int):
        from transformers import GPT2Config

        if arch.n_kv_head not in (None, arch.n_head):
            raise UnsupportedArchitectureError("arch gpt2 has no grouped-query attention: drop n_kv_head")
        hf = GPT2Config(
            vocab_size=vocab_size, n_positions=arch.context, n_embd=arch.n_embd, n_layer=arch.n_layer,
            n_head=arch.n_head, n_inner=arch.n_inner, resid_pdrop=arch.dropout, embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
            pad_token_id=eos_token_id, tie_word_embeddings=arch.tie_embeddings,
        )
        # llama.cpp's GPT-2 converter reads n_ctx, which recent GPT2Config no longer writes.
        hf.n_ctx = arch.context
        return hf

    def check(self, config) -> None:
        c = config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedArchitectureError(
                f"gpt2: activation_function {c.activation_function!r} is not supported (gelu_new only)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(c, flag, False):
                raise UnsupportedArchitectureError(f"gpt2: {flag}=True is not supported")
        if not getattr(c, "scale_attn_weights", True):
            raise UnsupportedArchitectureError("gpt2: scale_attn_weights=False is not supported")

    def describe(self, config) -> dict[str, Any]:
        c = config
        return {"model_type": c.model_type, "family": self.name, "n_layer": c.n_layer, "n_embd": c.n_embd,
                "n_head": c.n_head, "n_kv_head": c.n_head, "n_inner": c.n_inner or 4 * c.n_embd,
                "context": c.n_positions, "vocab_size": c.vocab_size,
                "tie_embeddings": bool(getattr(c, "tie_word_embeddings", True))}

    def context(self, config) -> int:
        return int(config.n_positions)

    # ------------------------------------------------------------------ compression
    def prune_structured(self, model, neurons: float, heads: float) -> dict[str, list]:
        """MLP neurons removed for real (a smaller ``n_inner``); heads zeroed, because GPT-2's attention needs a
        uniform head count. Neurons are scored by the norm of their in- and out-going weights, heads by the norm
        of their output projection (Michel et al., 2019)."""
        from transformers.pytorch_utils import Conv1D

        cfg = model.config
        inner = cfg.n_inner or 4 * cfg.n_embd
        keep_n = max(1, inner - int(neurons * inner))
        n_head, d_head = cfg.n_head, cfg.n_embd // cfg.n_head
        drop_h = min(n_head - 1, int(heads * n_head))
        if heads and not drop_h:
            raise UnsupportedArchitectureError(
                f"gpt2: heads={heads} of {n_head} attention heads zeroes none (at least one head must stay)")
        masks: dict[str, list[torch.Tensor]] = {}
        for i, block in enumerate(model.transformer.h):
            fc, proj = block.mlp.c_fc, block.mlp.c_proj  # Conv1D: fc.weight [embd, inner], proj.weight [inner, embd]
            if keep_n < inner:
                score = fc.weight.norm(dim=0) * proj.weight.norm(dim=1)
                keep = score.topk(keep_n).indices.sort().values
                new_fc, new_proj = Conv1D(keep_n, cfg.n_embd), Conv1D(cfg.n_embd, keep_n)
                new_fc.weight.data = fc.weight.data[:, keep].clone()
                new_fc.bias.data = fc.bias.data[keep].clone()
                new_proj.weight.data = proj.weight.data[keep].clone()
                new_proj.bias.data = proj.bias.data.clone()
                block.mlp.c_fc, block.mlp.c_proj = new_fc, new_proj
            if drop_h:
                attn = block.attn
                score = attn.c_proj.weight.reshape(n_head, d_head, -1).norm(dim=(1, 2))
                dropped = score.topk(drop_h, largest=False).indices
                head_mask = torch.ones(n_head)
                head_mask[dropped] = 0
                col = head_mask.repeat_interleave(d_head)  # [embd]
                qkv_mask = col.repeat(3)  # c_attn output is [q | k | v], each [embd]
                attn.c_attn.weight.data.mul_(qkv_mask[None, :])
                attn.c_attn.bias.data.mul_(qkv_mask)
                attn.c_proj.weight.data.mul_(col[:, None])
                masks[f"transformer.h.{i}.attn.c_attn.weight"] = [qkv_mask[None, :]]
                masks[f"transformer.h.{i}.attn.c_attn.bias"] = [qkv_mask]
                masks[f"transformer.h.{i}.attn.c_proj.weight"] = [col[:, None]]
        if keep_n < inner:
            cfg.n_inner = keep_n
        return masks

    # ------------------------------------------------------------------ distillation
    def student_config(self, teacher_config, n_layer, n_embd=None, n_head=None, n_kv_head=None, n_inner=None):
        c = copy.deepcopy(teacher_config)
        c.n_layer = n_layer
        if n_embd is not None:
            c.n_embd = n_embd
        if n_head is not None:
            c.n_head = n_head
        if n_kv_head not in (None, c.n_head):
            raise UnsupportedArchitectureError("gpt2 students have no grouped-query attention: drop n_kv_head")
        c.n_inner = n_inner if n_inner is not None else (None if n_embd is not None else teacher_config.n_inner)
        if c.n_embd % c.n_head:
            raise UnsupportedArchitectureError(f"student n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})")
        c.n_ctx = c.n_positions
        return c

    def init_student(self, student, teacher) -> list[int]:
        ts, ss = teacher.transformer, student.transformer
        if ts.wte.weight.shape != ss.wte.weight.shape or ts.wpe.weight.shape != ss.wpe.weight.shape:
            return []
        if ts.h[0].mlp.c_fc.weight.shape != ss.h[0].mlp.c_fc.weight.shape:
            return []
        picks = [int(i) for i in np.linspace(0, len(ts.h) - 1, len(ss.h)).round()]
        with torch.no_grad():
            ss.wte.weight.copy_(ts.wte.weight)
            ss.wpe.weight.copy_(ts.wpe.weight)
            ss.ln_f.load_state_dict(ts.ln_f.state_dict())
            for si, ti in enumerate(picks):
                ss.h[si].load_state_dict(ts.h[ti].state_dict())
            if not student.config.tie_word_embeddings and not teacher.config.tie_word_embeddings:
                student.lm_head.weight.copy_(teacher.lm_head.weight)
        return picks

    # ------------------------------------------------------------------ serving
    _SERVED = {"attn.c_attn": sv.QKV, "attn.c_proj": sv.ATTN_OUT, "mlp.c_fc": sv.MLP_UP, "mlp.c_proj": sv.MLP_DOWN}
    """GPT-2 block module -> serving decoder linear (the same linears: ``c_attn`` already holds q, k and v)."""

    def decoder_shape(self, config) -> sv.DecoderShape:
        c = config
        d, inner, hd = c.n_embd, c.n_inner or 4 * c.n_embd, c.n_embd // c.n_head
        return sv.DecoderShape(
            n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_head, head_dim=hd, n_embd=d, n_inner=inner,
            context=c.n_positions, vocab_size=c.vocab_size, eps=c.layer_norm_epsilon, norm="layer",
            activation="gelu_tanh", positions="learned",
            linears=sv.block_linears(d, c.n_head, c.n_head, hd, inner, gated=False))

    def decoder_weights(self, model) -> sv.DecoderWeights:
        """``Conv1D`` weights are already ``[in, out]``: every tensor is the model's own, none copied."""
        tr = model.transformer

        def norm(ln) -> sv.Norm:
            return sv.Norm(sv.fp32(ln.weight), sv.fp32(ln.bias))

        def block(b) -> sv.BlockWeights:
            mods = {"attn.c_attn": b.attn.c_attn, "attn.c_proj": b.attn.c_proj, "mlp.c_fc": b.mlp.c_fc,
                    "mlp.c_proj": b.mlp.c_proj}
            return sv.BlockWeights(norm_1=norm(b.ln_1), norm_2=norm(b.ln_2), linears={
                self._SERVED[n]: sv.LinearWeights(sv.fp32(m.weight), sv.fp32(m.bias)) for n, m in mods.items()})

        return sv.DecoderWeights(
            embedding=sv.fp32(tr.wte.weight), blocks=tuple(block(b) for b in tr.h), norm=norm(tr.ln_f),
            head=sv.fp32(model.lm_head.weight).t(), position_table=sv.fp32(tr.wpe.weight))

    def lora_site(self, module_path: str, config) -> sv.LoraSite | None:
        found = sv.block_module(module_path, "h", config.n_layer)  # [..., "h", "<layer>", "attn", "c_attn"]
        name = self._SERVED.get(found[1]) if found else None
        if name is None:
            return None
        return sv.LoraSite(found[0], name, 0, self.decoder_shape(config).linear_dims(name)[1])

    # ------------------------------------------------------------------ GGUF
    def write_gguf(self, model, writer, put) -> None:
        """llama.cpp's ``gpt2`` layout, as its ``convert_hf_to_gguf.py`` writes it: ``Conv1D`` weights transposed to
        ``[out, in]``, the fused ``c_attn`` kept as ``attn_qkv``, and the output head written out even when tied."""
        c = model.config
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        tr = model.transformer
        put("token_embd.weight", tr.wte.weight)
        put("position_embd.weight", tr.wpe.weight)
        for i, b in enumerate(tr.h):
            for gguf_name, module in (("attn_norm", b.ln_1), ("ffn_norm", b.ln_2)):
                put(f"blk.{i}.{gguf_name}.weight", module.weight)
                put(f"blk.{i}.{gguf_name}.bias", module.bias)
            for gguf_name, module in (("attn_qkv", b.attn.c_attn), ("attn_output", b.attn.c_proj),
                                      ("ffn_up", b.mlp.c_fc), ("ffn_down", b.mlp.c_proj)):
                put(f"blk.{i}.{gguf_name}.weight", module.weight.t())  # Conv1D [in, out] -> [out, in]
                put(f"blk.{i}.{gguf_name}.bias", module.bias)
        put("output_norm.weight", tr.ln_f.weight)
        put("output_norm.bias", tr.ln_f.bias)
        put("output.weight", model.lm_head.weight)


GPT2_FAMILY = register(GPT2())
