"""Byte-level BPE tokenizer shared by a whole tree.

The master trains it on its own data; every descendant inherits the same blob, and relations that combine
weights (adapters, merges, updates) compare tokenizer digests and refuse a mismatch. The pre-tokenizer is
GPT-2's byte-level split, which llama.cpp knows as ``gpt-2``, so exported models convert to GGUF.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerConfig:
    """How the tree's tokenizer is trained (part of the master's recipe)."""

    vocab_size: int = 4096
    """Number of tokens, including the 256 byte tokens and the end-of-text token."""
    min_frequency: int = 2
    """Merges seen fewer times than this are not learned."""


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
    return Tokenizer.from_str(data.decode())


def tokenizer_to_bytes(tok: Tokenizer) -> bytes:
    return tok.to_str().encode()


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS} token")
    return i


def encode_docs(tok: Tokenizer, texts: list[str], batch: int = 512) -> Iterator[list[int]]:
    """Token ids per document (fast, batched, multi-threaded in the Rust tokenizer)."""
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i : i + batch], add_special_tokens=False):
            yield enc.ids


def hf_tokenizer(tok: Tokenizer):
    """Wrap as a transformers fast tokenizer (for export and for `generate`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
