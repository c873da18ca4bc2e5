"""Model architecture configs and construction.

stemma trains GPT-2-style decoders (transformers' ``GPT2LMHeadModel``): a well-known layout that every tool
downstream (peft, llama.cpp's converter) understands. Imported masters may be any causal LM transformers
can load from safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2-style decoder."""

    n_layer: int = 6
    """Transformer blocks."""
    n_embd: int = 256
    """Hidden width."""
    n_head: int = 4
    """Attention heads (must divide ``n_embd``)."""
    context: int = 128
    """Maximum sequence length (position embeddings)."""
    dropout: float = 0.0
    """Dropout on residual, attention and embeddings; 0 keeps training deterministic."""


def build_gpt(cfg: GPTConfig, vocab_size: int, eos_token_id: int):
    """A freshly initialised GPT-2 model of the given shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    hf = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.context,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    # llama.cpp's GPT-2 converter reads n_ctx, which recent GPT2Config no longer writes.
    hf.n_ctx = cfg.context
    model = GPT2LMHeadModel(hf)
    return model


def count_params(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def model_context(model) -> int:
    c = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048
