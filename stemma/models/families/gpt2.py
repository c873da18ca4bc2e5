"""GPT-2 (transformers ``GPT2LMHeadModel``): learned positions, LayerNorm, GELU MLP, fused ``c_attn``,
``Conv1D`` projections stored ``[in, out]``, tied output head."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from . import register
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


GPT2_FAMILY = register(GPT2())
