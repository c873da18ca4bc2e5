"""`quantized`: weight-only quantisation of the parent, int8 per output channel or int4 per group.

Every linear layer (GPT-2's ``Conv1D`` or ``nn.Linear``), the token (and GPT-2's position) embeddings and the
output head are stored quantised: a tied head through the quantised embedding it shares, an untied one as a linear
layer of its own. Norms and biases stay fp32 (a few thousand values that every token passes through).
Activations stay fp32, weights are dequantised inside ``forward`` (`layers.QuantLinear`). No calibration
data: per-channel int8 is near lossless on its own (Dettmers et al., 2022, "LLM.int8()"), and int4 keeps
its error small with small groups and a clipping search per group (the group-wise format of Frantar et
al., 2023, "GPTQ", and Lin et al., 2024, "AWQ", without their data-driven rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..models.arch import count_params
from ..train.registry import BuildContext, BuildOutput, register
from . import Compression
from .layers import (
    QuantEmbedding,
    QuantLinear,
    TiedQuantHead,
    base_architecture,
    is_linear,
    output_name,
    save_variant,
    set_module,
    tied_lm_head,
)


@dataclass(frozen=True)
class QuantizeConfig:
    """Weight-only quantisation of the parent."""

    bits: Literal[8, 4] = 8
    """8: symmetric int8 with one scale per output channel; 4: symmetric int4 with one fp16 scale per group."""
    group_size: int = 32
    """Input channels sharing one scale at 4 bits (ignored at 8 bits); smaller groups: less error, more scales."""
    embeddings: bool = True
    """Quantise the embedding tables too (in a small model they hold a large share of the weights)."""
    clip_grid: int = 8
    """Clipping ratios tried per int4 group (1.0 down to 0.75); the one with the least squared error is kept."""


def quantize_model(model: nn.Module, cfg: QuantizeConfig) -> dict[str, dict]:
    """Swap every linear layer (and the embeddings) for `QuantLinear`/`QuantEmbedding`; returns their descriptions."""
    kind = "int8" if cfg.bits == 8 else "int4"
    head_name = output_name(model)
    tied = tied_lm_head(model)
    modules: dict[str, dict] = {}
    targets = [(n, m) for n, m in model.named_modules()
               if is_linear(m) or (cfg.embeddings and isinstance(m, nn.Embedding))]
    for name, m in targets:
        if tied and name == head_name and cfg.embeddings:
            continue  # replaced by a head that reads the quantised embedding below
        if isinstance(m, nn.Embedding):
            table = _table(m, cfg)
            new: nn.Module = QuantEmbedding(table)
            modules[name] = {"kind": kind, "in": table.in_features, "out": table.out_features, "bias": False,
                             "group": table.group_size, "embedding": True}
        else:
            new = QuantLinear.from_linear(m, cfg.bits, cfg.group_size)
            modules[name] = {"kind": kind, "in": new.in_features, "out": new.out_features,
                             "bias": new.bias is not None, "group": new.group_size}
        set_module(model, name, new)
    if tied and cfg.embeddings and head_name:
        emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        set_module(model, head_name, TiedQuantHead(model.get_input_embeddings()))
        modules[head_name] = {"kind": "tied_head", "embedding": emb_name}
    return modules


def _table(m: nn.Embedding, cfg: QuantizeConfig) -> QuantLinear:
    """An embedding's table [tokens, dim] quantised like a linear layer's [out, in] weight (a scale per token)."""
    lin = nn.Linear(m.embedding_dim, m.num_embeddings, bias=False)
    lin.weight = m.weight
    return QuantLinear.from_linear(lin, cfg.bits, cfg.group_size)


@register
class Quantize(Compression):
    name = "quantized"
    relation = "quantized"
    config_cls = QuantizeConfig

    def run(self, ctx: BuildContext, cfg: QuantizeConfig) -> BuildOutput:
        model = ctx.load_parent()
        n = count_params(model)
        modules = quantize_model(model, cfg)
        scheme = {"method": self.name, "bits": cfg.bits, "group_size": cfg.group_size if cfg.bits == 4 else None,
                  "embeddings": cfg.embeddings}
        ctx.reporter.log(f"{ctx.node}: {len(modules)} modules quantised to int{cfg.bits}")
        return BuildOutput(
            files=save_variant(model, scheme, modules), tokenizer=ctx.parent.row.tokenizer, params=n, own_params=n,
            architecture={**base_architecture(ctx.parent.manifest), "variant": scheme},
        )
