"""What the serving decoder (`stemma.serve.decoder`) reads from a model: a frozen shape and the weights.

A family turns its transformers config into a `DecoderShape` (`Family.decoder_shape`) and a loaded model into
`DecoderWeights` (`Family.decoder_weights`); the decoder runs any family from these two alone. Its block has four
linears, named by role and stored ``[in, out]`` (``y = x @ W + b``):

- ``attn.qkv``: queries, keys and values side by side (``[q | k | v]``: ``n_head``, ``n_kv_head``, ``n_kv_head``
  heads of ``head_dim``), GPT-2's ``c_attn`` or Llama's q/k/v projections fused;
- ``attn.out``: the attention output projection;
- ``mlp.up``: GPT-2's ``c_fc``, or Llama's ``[gate | up]`` fused (``2 * n_inner`` columns);
- ``mlp.down``: back to ``n_embd``.

Fusing costs a copy of those weights at load and saves GEMM calls on every step; a PEFT LoRA on one of the fused
projections lands in its column slice (`LoraSite`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

QKV, ATTN_OUT, MLP_UP, MLP_DOWN = "attn.qkv", "attn.out", "mlp.up", "mlp.down"
LINEARS = (QKV, ATTN_OUT, MLP_UP, MLP_DOWN)
"""The decoder block's linears, in the order a block runs them."""
NORMS = ("layer", "rms")
ACTIVATIONS = ("gelu_tanh", "silu_glu")
POSITIONS = ("learned", "rope")


@dataclass(frozen=True)
class DecoderShape:
    """Shape of a decoder-only transformer as the serving decoder runs it."""

    n_layer: int
    """Transformer blocks."""
    n_head: int
    """Query heads."""
    n_kv_head: int
    """Key/value heads (fewer than ``n_head``: grouped-query attention, ``n_head / n_kv_head`` queries per KV head)."""
    head_dim: int
    """Width of one head."""
    n_embd: int
    """Hidden width."""
    n_inner: int
    """MLP width (of each half of a gated MLP)."""
    context: int
    """Longest sequence (rows of the KV cache, and of the position table)."""
    vocab_size: int
    """Rows of the token embedding and columns of the output head."""
    eps: float
    """Epsilon of every norm."""
    norm: str
    """``layer`` (LayerNorm with bias) or ``rms`` (RMSNorm, weight only)."""
    activation: str
    """``gelu_tanh`` (GELU, tanh approximation, on ``mlp.up``) or ``silu_glu`` (``silu(gate) * up``)."""
    positions: str
    """``learned`` (a position table added to the embedding) or ``rope`` (rotary, on queries and keys)."""
    linears: tuple[tuple[str, int, int], ...]
    """(name, in, out) of each block linear (`LINEARS`)."""

    def __post_init__(self):
        for field_, value, allowed in (("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                       ("positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"DecoderShape.{field_} {value!r} is not one of {', '.join(allowed)}")
        if tuple(n for n, _, _ in self.linears) != LINEARS:
            raise ValueError(f"DecoderShape.linears must name {', '.join(LINEARS)} in order")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_kv_head

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.linears)

    def linear_dims(self, name: str) -> tuple[int, int]:
        """(in, out) of a block linear."""
        for n, d_in, d_out in self.linears:
            if n == name:
                return d_in, d_out
        raise KeyError(name)

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs of one token attending to ``context`` keys (2 per multiply-add, LoRA excluded)."""
        linears = sum(d_in * d_out for _, d_in, d_out in self.linears) * self.n_layer
        attention = 2 * self.n_layer * self.n_head * self.head_dim * context  # q.k and p.v
        return 2.0 * (linears + self.vocab_size * self.n_embd + attention)


def block_linears(n_embd: int, n_head: int, n_kv_head: int, head_dim: int, n_inner: int,
                  gated: bool) -> tuple[tuple[str, int, int], ...]:
    """The (name, in, out) of the four block linears of a decoder with these sizes."""
    q, kv = n_head * head_dim, n_kv_head * head_dim
    return ((QKV, n_embd, q + 2 * kv), (ATTN_OUT, q, n_embd), (MLP_UP, n_embd, (2 if gated else 1) * n_inner),
            (MLP_DOWN, n_inner, n_embd))


@dataclass(frozen=True)
class Norm:
    """One LayerNorm or RMSNorm."""

    weight: torch.Tensor
    """[n_embd]."""
    bias: torch.Tensor | None = None
    """[n_embd] (LayerNorm only)."""


@dataclass(frozen=True)
class LinearWeights:
    """One linear, ``y = x @ w + bias``."""

    w: torch.Tensor
    """[in, out] (a transposed view of an ``nn.Linear`` weight is fine: the decoder lays it out itself)."""
    bias: torch.Tensor | None = None
    """[out]."""


@dataclass(frozen=True)
class BlockWeights:
    """One transformer block: ``x += attn(norm_1(x)); x += mlp(norm_2(x))``."""

    norm_1: Norm
    """Before attention."""
    norm_2: Norm
    """Before the MLP."""
    linears: dict[str, LinearWeights]
    """`LINEARS` name -> weights."""


@dataclass(frozen=True)
class DecoderWeights:
    """Every weight the serving decoder needs, fp32, detached from autograd."""

    embedding: torch.Tensor
    """Token embedding [vocab, n_embd]."""
    blocks: tuple[BlockWeights, ...]
    norm: Norm
    """Final norm."""
    head: torch.Tensor
    """Output head [n_embd, vocab] (the embedding's transpose when tied)."""
    position_table: torch.Tensor | None = None
    """Learned positions [context, n_embd] (``positions == "learned"``)."""
    inv_freq: torch.Tensor | None = None
    """RoPE inverse frequencies [head_dim / 2], as the model's rotary embedding computed them for its scaling type."""
    attention_scaling: float = 1.0
    """Factor on RoPE's cos and sin (transformers' ``attention_scaling``; 1 for default, linear and llama3)."""


class LoraSite(NamedTuple):
    """Where a PEFT LoRA on one projection lands in the serving decoder."""

    layer: int
    linear: str
    """The decoder linear (`LINEARS`)."""
    column: int
    """First output column of the projection inside the decoder linear."""
    width: int
    """Output columns of the projection."""


def block_module(module_path: str, container: str, n_layer: int) -> tuple[int, str] | None:
    """(layer, path inside the block) of a module path like ``base_model.model.<container>.3.attn.c_attn``, or None
    when it names no module of a block ``0 <= layer < n_layer``."""
    parts = module_path.split(".")
    try:
        i = parts.index(container)
        layer = int(parts[i + 1])
    except (ValueError, IndexError):
        return None
    return (layer, ".".join(parts[i + 2:])) if 0 <= layer < n_layer else None


def fp32(t: torch.Tensor) -> torch.Tensor:
    """A weight as the decoder keeps it: fp32, no autograd (no copy when it already is fp32)."""
    return t.detach().float()

