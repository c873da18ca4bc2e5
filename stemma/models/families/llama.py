"""The Llama layout (transformers ``LlamaForCausalLM``, and ``MistralForCausalLM`` / ``Qwen2ForCausalLM``, which
share it): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, ``nn.Linear`` projections stored
``[out, in]``, tied or untied output head, optional q/k/v bias (Qwen2)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from . import register
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

        inner = arch.n_inner or 32 * -(-(8 * arch.n_embd) // (3 * 32))
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=arch.n_embd, intermediate_size=inner,
            num_hidden_layers=arch.n_layer, num_attention_heads=arch.n_head,
            num_key_value_heads=arch.n_kv_head or arch.n_head, max_position_embeddings=arch.context,
            rms_norm_eps=1e-5, rope_theta=arch.rope_theta, tie_word_embeddings=arch.tie_embeddings,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
            attention_bias=False, mlp_bias=False, hidden_act="silu",
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

    # ------------------------------------------------------------------ distillation
    def student_config(self, teacher_config, n_layer, n_embd=None, n_head=None, n_kv_head=None, n_inner=None):
        c = copy.deepcopy(teacher_config)
        c.num_hidden_layers = n_layer
        if n_embd is not None and n_embd != c.hidden_size:
            c.hidden_size = n_embd
            c.head_dim = None
            if n_inner is None:
                c.intermediate_size = 32 * -(-(8 * n_embd) // (3 * 32))
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


LLAMA_FAMILY = register(Llama())
