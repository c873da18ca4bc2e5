"""The interface every model family implements, and the shape of a model stemma builds itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import StemmaError


class UnsupportedArchitectureError(StemmaError):
    """A checkpoint or config uses a feature its family does not implement (named in the message)."""


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a decoder stemma builds (pretrain, a distilled student of another family)."""

    arch: str = "gpt2"
    """Model family: ``gpt2`` (learned positions, LayerNorm, GELU) or ``llama`` (RoPE, RMSNorm, SwiGLU, GQA)."""
    n_layer: int = 6
    """Transformer blocks."""
    n_embd: int = 256
    """Hidden width."""
    n_head: int = 4
    """Attention heads (must divide ``n_embd``)."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention (llama; must divide ``n_head``); default: ``n_head``."""
    n_inner: int | None = None
    """MLP width; default: 4 x ``n_embd`` (gpt2), or 8/3 x ``n_embd`` rounded up to a multiple of 32 (llama)."""
    context: int = 128
    """Maximum sequence length."""
    rope_theta: float = 10000.0
    """RoPE base (llama)."""
    tie_embeddings: bool = True
    """Share the output head with the token embedding."""
    dropout: float = 0.0
    """Dropout (gpt2: residual, attention and embeddings; llama: attention); 0 keeps training deterministic."""

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise StemmaError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise StemmaError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if min(self.n_layer, self.n_embd, self.n_head, self.context) < 1:
            raise StemmaError("n_layer, n_embd, n_head and context must be positive")


class Family:
    """Everything stemma needs to know about one decoder layout.

    Methods take transformers configs and models of the family; `stemma.models.families.of` picks the family of
    a config by its ``model_type``.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    """Hugging Face ``model_type`` values this family loads."""
    lora_targets: ClassVar[tuple[str, ...]]
    """Default LoRA target modules: every attention and MLP projection."""
    lora_fan_in_fan_out: ClassVar[bool] = False
    """Whether the projections store ``[in, out]`` (GPT-2's ``Conv1D``), as PEFT must be told."""

    # ------------------------------------------------------------------ configs
    def hf_config(self, arch: ArchConfig, vocab_size: int, eos_token_id: int):
        """The transformers config of a model stemma builds with this shape."""
        raise NotImplementedError

    def build(self, arch: ArchConfig, vocab_size: int, eos_token_id: int):
        """A freshly initialised model (seed the RNG first for a reproducible one)."""
        from transformers import AutoModelForCausalLM

        arch.check()
        return AutoModelForCausalLM.from_config(self.hf_config(arch, vocab_size, eos_token_id))

    def check(self, config) -> None:
        """Refuse, with one line naming the field, what this family's code does not implement."""

    def describe(self, config) -> dict[str, Any]:
        """Architecture facts for a version's manifest (``model_type``, ``family``, sizes)."""
        raise NotImplementedError

    def context(self, config) -> int:
        """Longest sequence the model takes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ distillation
    def student_config(self, teacher_config, n_layer: int, n_embd: int | None = None, n_head: int | None = None,
                       n_kv_head: int | None = None, n_inner: int | None = None):
        """The teacher's config with a smaller shape (same vocabulary, context and positional scheme)."""
        raise NotImplementedError

    def init_student(self, student, teacher) -> list[int]:
        """Copy the teacher's embeddings, final norm, head and evenly spaced blocks into the student where shapes
        match (Sanh et al., 2019); returns the teacher blocks used (empty: nothing copied)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ compression
    def prune_structured(self, model, neurons: float, heads: float) -> dict[str, list]:
        """Remove MLP neurons and attention heads (or whole KV groups) in place; returns gradient masks for what
        had to be zeroed rather than removed (parameter name -> [mask]). A ``heads`` share that rounds to no head
        is refused with one line, as is a family without structured pruning."""
        raise UnsupportedArchitectureError(f"{self.name}: structured pruning is not implemented; use unstructured")

    def restore_buffers(self, model) -> None:
        """Recompute non-persistent buffers (e.g. RoPE frequencies) of a model built on the ``meta`` device."""

    # ------------------------------------------------------------------ serving
    def decoder_shape(self, config):
        """The serving decoder's `DecoderShape` for this config (`stemma.models.families.serving`)."""
        raise NotImplementedError

    def decoder_weights(self, model):
        """The serving decoder's `DecoderWeights` of a loaded model (tensors shared, not copied)."""
        raise NotImplementedError

    def lora_site(self, module_path: str, config):
        """Where a PEFT LoRA on ``module_path`` (e.g. ``model.layers.3.self_attn.k_proj``) lands in the serving
        decoder: (layer, decoder linear, first output column, output width), or None if it is not a block linear."""
        raise NotImplementedError

    # ------------------------------------------------------------------ GGUF
    gguf_arch: ClassVar[str]
    """llama.cpp's architecture name for the family's own configs (`gguf_architecture` may pick another)."""

    def gguf_architecture(self, config) -> str:
        """llama.cpp's architecture name for ``config``; refuses, with one line, what no llama.cpp architecture
        expresses. Called before anything is written."""
        return self.gguf_arch

    def write_gguf(self, model, writer, put) -> None:
        """Add the architecture metadata and every tensor in llama.cpp's layout.

        Args:
            model: a plain transformers model of the family (adapters merged, compressed modules expanded).
            writer: the ``gguf.GGUFWriter`` made for `gguf_architecture`; the file type and tokenizer are written
                by the caller.
            put: ``put(name, tensor)`` adds one tensor in the requested precision.
        """
        raise NotImplementedError
