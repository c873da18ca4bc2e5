"""The Llama layout (transformers ``LlamaForCausalLM``, and ``MistralForCausalLM`` / ``Qwen2ForCausalLM``, which
share it): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, ``nn.Linear`` projections stored
``[out, in]``, tied or untied output head, optional q/k/v bias (Qwen2)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from . import register
from . import serving as sv
from .base import ArchConfig, Family, UnsupportedArchitectureError

ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE variants implemented: static frequencies (transformers computes them; serving and GGUF read them)."""


def rope_parameters(config) -> dict[str, Any]:
    """``rope_type``, ``rope_theta`` and the scaling fields, whichever way the transformers version spells them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    out = {**scaling, **params}
    out.setdefault("rope_type", out.pop("type", None) or "default")
    if "rope_theta" not in out:
        out["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return out


def default_inner(n_embd: int) -> int:
    """SwiGLU's usual MLP width: 8/3 of the hidden width (keeping the parameters of a 4x GELU MLP), rounded up to
    a multiple of 32."""
    return 32 * -(-(8 * n_embd) // (3 * 32))


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gguf_arch = "llama"

    # ------------------------------------------------------------------ configs
    def hf_config(self, arch: ArchConfig, vocab_size: int, eos_token_id: int):
        from transformers import LlamaConfig

        inner = arch.n_inner or default_inner(arch.n_embd)
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=arch.n_embd, intermediate_size=inner,
            num_hidden_layers=arch.n_layer, num_attention_heads=arch.n_head,
            num_key_value_heads=arch.n_kv_head or arch.n_head, max_position_embeddings=arch.context,
            rms_norm_eps=1e-5, rope_theta=arch.rope_theta, tie_word_embeddings=arch.tie_embeddings,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
            attention_bias=False, mlp_bias=False, hidden_act="silu", attention_dropout=arch.dropout,
        )

    def check(self, config) -> None:
        c = config
        mt = c.model_type
        if getattr(c, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"{mt}: hidden_act {c.hidden_act!r} is not supported (silu only)")
        if getattr(c, "mlp_bias", False):
            raise UnsupportedArchitectureError(f"{mt}: mlp_bias=True is not supported")
        if getattr(c, "pretraining_tp", 1) not in (1, None):
            raise UnsupportedArchitectureError(f"{mt}: pretraining_tp={c.pretraining_tp} is not supported")
        rope = rope_parameters(c)
        if rope["rope_type"] not in ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"{mt}: rope_scaling type {rope['rope_type']!r} is not supported (one of {', '.join(ROPE_TYPES)})")
        if mt == "mistral" or mt == "qwen2":
            sw = getattr(c, "sliding_window", None)
            in_use = sw is not None and (mt == "mistral" or getattr(c, "use_sliding_window", False))
            if in_use and sw < c.max_position_embeddings:
                raise UnsupportedArchitectureError(
                    f"{mt}: sliding_window={sw} below max_position_embeddings={c.max_position_embeddings} "
                    "(sliding-window attention) is not supported")
        if mt == "qwen2" and getattr(c, "layer_types", None) and any(t != "full_attention" for t in c.layer_types):
            raise UnsupportedArchitectureError(f"{mt}: layer_types other than full_attention are not supported")
        if c.num_attention_heads % kv_heads(c):
            raise UnsupportedArchitectureError(
                f"{mt}: num_key_value_heads={kv_heads(c)} does not divide num_attention_heads={c.num_attention_heads}")

    def qkv_bias(self, config) -> bool:
        """Qwen2 always has q/k/v biases; Llama and Mistral when ``attention_bias`` is set."""
        return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))

    def o_bias(self, config) -> bool:
        return config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))

    def describe(self, config) -> dict[str, Any]:
        c = config
        rope = rope_parameters(c)
        return {"model_type": c.model_type, "family": self.name, "n_layer": c.num_hidden_layers,
                "n_embd": c.hidden_size, "n_head": c.num_attention_heads, "n_kv_head": kv_heads(c),
                "head_dim": head_dim(c), "n_inner": c.intermediate_size, "context": c.max_position_embeddings,
                "vocab_size": c.vocab_size, "rope_theta": rope["rope_theta"], "rope_type": rope["rope_type"],
                "qkv_bias": self.qkv_bias(c), "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False))}

    def context(self, config) -> int:
        return int(config.max_position_embeddings)

    def restore_buffers(self, model) -> None:
        """RoPE's frequencies are non-persistent buffers: a skeleton built on ``meta`` gets them recomputed here."""
        inner = model.model
        rotary = inner.rotary_emb
        if any(b.is_meta for b in rotary.buffers()):
            with torch.device("cpu"):
                inner.rotary_emb = type(rotary)(config=model.config)

    # ------------------------------------------------------------------ compression
    def prune_structured(self, model, neurons: float, heads: float) -> dict[str, list]:
        """MLP neurons and whole KV groups removed for real, so the pruned model is a plain, smaller Llama.

        A neuron is a row of gate and up and a column of down, scored by the product of their norms. A KV group is one
        key/value head with the query heads that share it (rows of q, k, v; columns of o), scored by the norm of its
        query heads' output projection (Michel et al., 2019). ``heads`` is the share of KV groups removed (at
        least one stays); ``head_dim`` is written into the config, so the hidden size does not change.
        """
        from torch import nn

        c = model.config
        inner = c.intermediate_size
        keep_n = max(1, inner - int(neurons * inner))
        n_kv, hd = kv_heads(c), head_dim(c)
        group = c.num_attention_heads // n_kv
        drop_g = min(n_kv - 1, int(heads * n_kv))
        if heads and not drop_g:
            # GQA's shapes only allow removing a key/value head together with all the query heads reading it.
            raise UnsupportedArchitectureError(
                f"{c.model_type}: heads={heads} of {n_kv} KV groups removes none (structured pruning removes whole "
                "KV groups, and at least one must stay)")

        def cut(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
            w = lin.weight.data.index_select(dim, idx).clone()
            new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
            new.weight.data = w
            if lin.bias is not None:
                new.bias.data = (lin.bias.data.index_select(0, idx) if dim == 0 else lin.bias.data).clone()
            return new

        for layer in model.model.layers:
            mlp = layer.mlp
            if keep_n < inner:
                score = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
                         * mlp.down_proj.weight.norm(dim=0))
                keep = score.topk(keep_n).indices.sort().values
                mlp.gate_proj, mlp.up_proj = cut(mlp.gate_proj, keep, 0), cut(mlp.up_proj, keep, 0)
                mlp.down_proj = cut(mlp.down_proj, keep, 1)
            if drop_g:
                att = layer.self_attn
                o = att.o_proj.weight.data.view(att.o_proj.weight.shape[0], n_kv, group * hd)  # [C, kv, group*D]
                score = o.norm(dim=(0, 2))  # [n_kv]
                kept = score.topk(n_kv - drop_g).indices.sort().values
                q_idx = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in kept.tolist()])
                kv_idx = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept.tolist()])
                att.q_proj = cut(att.q_proj, q_idx, 0)
                att.k_proj, att.v_proj = cut(att.k_proj, kv_idx, 0), cut(att.v_proj, kv_idx, 0)
                att.o_proj = cut(att.o_proj, q_idx, 1)
                att.num_key_value_groups = group
        if keep_n < inner:
            c.intermediate_size = keep_n
            for layer in model.model.layers:
                layer.mlp.intermediate_size = keep_n
        if drop_g:
            c.head_dim = hd
            c.num_key_value_heads = n_kv - drop_g
            c.num_attention_heads = (n_kv - drop_g) * group
        return {}

    # ------------------------------------------------------------------ distillation
    def student_config(self, teacher_config, n_layer, n_embd=None, n_head=None, n_kv_head=None, n_inner=None):
        c = copy.deepcopy(teacher_config)
        c.num_hidden_layers = n_layer
        if n_embd is not None and n_embd != c.hidden_size:
            c.hidden_size = n_embd
            c.head_dim = None
            if n_inner is None:
                c.intermediate_size = default_inner(n_embd)
        if n_head is not None:
            c.num_attention_heads = n_head
            c.head_dim = None
        if n_kv_head is not None:
            c.num_key_value_heads = n_kv_head
        elif n_head is not None and c.num_attention_heads % kv_heads(c):
            c.num_key_value_heads = n_head
        if n_inner is not None:
            c.intermediate_size = n_inner
        if getattr(c, "head_dim", None) is None:
            if c.hidden_size % c.num_attention_heads:
                raise UnsupportedArchitectureError(
                    f"student n_embd ({c.hidden_size}) must be divisible by n_head ({c.num_attention_heads})")
            c.head_dim = c.hidden_size // c.num_attention_heads
        if hasattr(c, "layer_types") and c.layer_types is not None:
            c.layer_types = list(c.layer_types[:1]) * n_layer
        return c

    def init_student(self, student, teacher) -> list[int]:
        ts, ss = teacher.model, student.model
        if ts.embed_tokens.weight.shape != ss.embed_tokens.weight.shape:
            return []
        t0, s0 = ts.layers[0].state_dict(), ss.layers[0].state_dict()
        if set(t0) != set(s0) or any(t0[k].shape != s0[k].shape for k in t0):
            return []
        picks = [int(i) for i in np.linspace(0, len(ts.layers) - 1, len(ss.layers)).round()]
        with torch.no_grad():
            ss.embed_tokens.weight.copy_(ts.embed_tokens.weight)
            ss.norm.load_state_dict(ts.norm.state_dict())
            for si, ti in enumerate(picks):
                ss.layers[si].load_state_dict(ts.layers[ti].state_dict())
            if not student.config.tie_word_embeddings:
                student.lm_head.weight.copy_(teacher.lm_head.weight)
        return picks

    # ------------------------------------------------------------------ serving
    def decoder_shape(self, config) -> sv.DecoderShape:
        c = config
        n_kv, hd = kv_heads(c), head_dim(c)
        return sv.DecoderShape(
            n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_kv_head=n_kv, head_dim=hd,
            n_embd=c.hidden_size, n_inner=c.intermediate_size, context=c.max_position_embeddings,
            vocab_size=c.vocab_size, eps=c.rms_norm_eps, norm="rms", activation="silu_glu", positions="rope",
            linears=sv.block_linears(c.hidden_size, c.num_attention_heads, n_kv, hd, c.intermediate_size, gated=True))

    def decoder_weights(self, model) -> sv.DecoderWeights:
        """q/k/v and gate/up are fused into one ``[in, out]`` weight each (a copy of those weights); the others are
        transposed views of the model's own. RoPE's frequencies come from the model's rotary embedding, which
        transformers computed for the config's scaling type."""
        inner = model.model

        def linear(*mods) -> sv.LinearWeights:
            w = torch.cat([sv.fp32(m.weight) for m in mods]) if len(mods) > 1 else sv.fp32(mods[0].weight)
            if all(m.bias is None for m in mods):
                return sv.LinearWeights(w.t())
            bias = [sv.fp32(m.bias) if m.bias is not None else torch.zeros(m.out_features) for m in mods]
            return sv.LinearWeights(w.t(), torch.cat(bias))

        def block(b) -> sv.BlockWeights:
            at, mlp = b.self_attn, b.mlp
            return sv.BlockWeights(
                norm_1=sv.Norm(sv.fp32(b.input_layernorm.weight)),
                norm_2=sv.Norm(sv.fp32(b.post_attention_layernorm.weight)),
                linears={sv.QKV: linear(at.q_proj, at.k_proj, at.v_proj), sv.ATTN_OUT: linear(at.o_proj),
                         sv.MLP_UP: linear(mlp.gate_proj, mlp.up_proj), sv.MLP_DOWN: linear(mlp.down_proj)})

        rotary = inner.rotary_emb
        return sv.DecoderWeights(
            embedding=sv.fp32(inner.embed_tokens.weight), blocks=tuple(block(b) for b in inner.layers),
            norm=sv.Norm(sv.fp32(inner.norm.weight)), head=sv.fp32(model.get_output_embeddings().weight).t(),
            inv_freq=sv.fp32(rotary.inv_freq), attention_scaling=float(rotary.attention_scaling))

    def lora_site(self, module_path: str, config) -> sv.LoraSite | None:
        """q/k/v land in column slices of the fused ``attn.qkv``, gate/up in halves of ``mlp.up``."""
        # [..., "layers", "<layer>", "self_attn", "k_proj"]
        found = sv.block_module(module_path, "layers", config.num_hidden_layers)
        if found is None:
            return None
        q, kv = config.num_attention_heads * head_dim(config), kv_heads(config) * head_dim(config)
        f, d = config.intermediate_size, config.hidden_size
        site = {"self_attn.q_proj": (sv.QKV, 0, q), "self_attn.k_proj": (sv.QKV, q, kv),
                "self_attn.v_proj": (sv.QKV, q + kv, kv), "self_attn.o_proj": (sv.ATTN_OUT, 0, d),
                "mlp.gate_proj": (sv.MLP_UP, 0, f), "mlp.up_proj": (sv.MLP_UP, f, f),
                "mlp.down_proj": (sv.MLP_DOWN, 0, d)}.get(found[1])
        return None if site is None else sv.LoraSite(found[0], *site)

    # ------------------------------------------------------------------ GGUF
    def gguf_architecture(self, config) -> str:
        # llama.cpp's converter writes Qwen2 checkpoints as its own ``qwen2`` architecture (rotate-half RoPE, q/k/v
        # biases) and Llama and Mistral ones as ``llama``.
        if config.model_type != "qwen2":
            return "llama"
        if rope_parameters(config)["rope_type"] == "llama3":
            raise UnsupportedArchitectureError(
                "GGUF: llama.cpp's qwen2 architecture has no per-frequency RoPE factors, so llama3 rope_scaling "
                "cannot be written for a qwen2 model")
        return "qwen2"

    @staticmethod
    def _pairs_adjacent(w: torch.Tensor, heads: int) -> torch.Tensor:
        """Reorder a q/k projection's output rows from transformers' RoPE layout (each head's dimension i pairs
        with i + head_dim/2) to llama.cpp's ``llama`` one (pairs 2j, 2j+1), as its converter does."""
        d = w.shape[0] // heads
        return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    def write_gguf(self, model, writer, put) -> None:
        """llama.cpp's ``llama`` or ``qwen2`` layout, with the metadata its converter writes.

        ``llama`` rotates adjacent pairs, so q/k rows (and biases) are reordered per head; ``qwen2`` rotates halves
        as transformers does and takes the weights as they are. A tied head is left out: llama.cpp then reads
        ``token_embd`` for the output, as it does for the converter's files. Linear RoPE scaling is metadata; llama3
        scaling is the ``rope_freqs`` tensor of per-frequency divisors, taken from the frequencies the model uses.
        """
        c = model.config
        arch = self.gguf_architecture(c)
        n_head, n_kv, hd = c.num_attention_heads, kv_heads(c), head_dim(c)
        rope = rope_parameters(c)
        writer.add_vocab_size(c.vocab_size)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(hd)
        writer.add_value_length(hd)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        if rope["rope_type"] == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        inner = model.model
        put("token_embd.weight", inner.embed_tokens.weight)
        if rope["rope_type"] == "llama3":
            used = inner.rotary_emb.inv_freq.detach().float()
            plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            put("rope_freqs.weight", plain / used)
        permute = arch == "llama"
        qk_bias, o_bias = self.qkv_bias(c), self.o_bias(c)
        for i, layer in enumerate(inner.layers):
            at, mlp = layer.self_attn, layer.mlp
            for part, proj, heads in (("q", at.q_proj, n_head), ("k", at.k_proj, n_kv), ("v", at.v_proj, 0)):
                names = ("weight", "bias") if qk_bias else ("weight",)
                for kind in names:
                    t = getattr(proj, kind)
                    put(f"blk.{i}.attn_{part}.{kind}", self._pairs_adjacent(t, heads) if permute and heads else t)
            put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
            put(f"blk.{i}.attn_output.weight", at.o_proj.weight)
            if o_bias:
                put(f"blk.{i}.attn_output.bias", at.o_proj.bias)
            put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
            put(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
            put(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
            put(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
        put("output_norm.weight", inner.norm.weight)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != inner.embed_tokens.weight.data_ptr():
            put("output.weight", head)


LLAMA_FAMILY = register(Llama())
