"""`lowrank`: every linear layer of the parent replaced by a truncated SVD, ``W ~ A @ B``.

By Eckart-Young the rank-r truncation is the best rank-r approximation in Frobenius norm; Denton et al.
(2014, "Exploiting linear structure within convolutional networks") used it to compress trained layers.
Every linear layer means GPT-2's ``Conv1D`` and ``nn.Linear`` alike; the output head only on request and only when
untied. A layer is factorised only where the factors are smaller than the dense weight; the rest stays dense. The
rank is given directly or chosen per layer to keep a share of the squared singular values ("energy").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import SpecError
from ..models.arch import count_params
from ..train.registry import BuildContext, BuildOutput, register
from . import Compression
from .layers import (
    LowRankLinear,
    base_architecture,
    is_linear,
    linear_weight,
    output_name,
    rank_for_energy,
    save_variant,
    set_module,
    tied_lm_head,
)


@dataclass(frozen=True)
class LowRankConfig:
    """Truncated SVD of the parent's linear layers."""

    rank: int | None = None
    """Rank kept in every layer (set this or ``energy``)."""
    energy: float | None = None
    """Share of the squared singular values kept per layer, in (0, 1]; the rank follows per layer."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage type of the factors (computation is in the activations' type)."""
    include_head: bool = False
    """Factorise the output projection too (only when it is not tied to the embedding: a tied head stays the
    embedding's table)."""


def lowrank_model(model: torch.nn.Module, cfg: LowRankConfig) -> dict[str, dict]:
    """Swap linear layers for `LowRankLinear` where that saves space; returns their descriptions."""
    head = output_name(model)
    keep_head = not cfg.include_head or tied_lm_head(model)  # factorising a tied head would store the table twice
    modules: dict[str, dict] = {}
    dtype = getattr(torch, cfg.dtype)
    for name, m in list(model.named_modules()):
        if not is_linear(m) or (name == head and keep_head):
            continue
        w = linear_weight(m).float()
        out_f, in_f = w.shape
        if cfg.rank is not None:
            r = min(cfg.rank, out_f, in_f)
        else:
            r = rank_for_energy(torch.linalg.svdvals(w), cfg.energy)
        if r * (in_f + out_f) >= in_f * out_f:
            continue  # the factors would be larger than the dense weight
        new = LowRankLinear.from_linear(m, r, dtype=dtype)
        set_module(model, name, new)
        modules[name] = {"kind": "lowrank", "in": in_f, "out": out_f, "rank": r, "bias": new.bias is not None,
                         "dtype": cfg.dtype}
    return modules


@register
class LowRank(Compression):
    name = "lowrank"
    relation = "lowrank"
    config_cls = LowRankConfig

    def make_config(self, raw, where):
        cfg = super().make_config(raw, where)
        if (cfg.rank is None) == (cfg.energy is None):
            raise SpecError(f"{where}: lowrank needs exactly one of rank or energy")
        if cfg.rank is not None and cfg.rank < 1:
            raise SpecError(f"{where}: lowrank rank must be >= 1")
        if cfg.energy is not None and not 0 < cfg.energy <= 1:
            raise SpecError(f"{where}: lowrank energy must be in (0, 1]")
        return cfg

    def run(self, ctx: BuildContext, cfg: LowRankConfig) -> BuildOutput:
        model = ctx.load_parent()
        n_before = count_params(model)
        modules = lowrank_model(model, cfg)
        n = count_params(model)
        scheme = {"method": self.name, "rank": cfg.rank, "energy": cfg.energy, "dtype": cfg.dtype,
                  "ranks": {k: d["rank"] for k, d in modules.items()}}
        ctx.reporter.log(f"{ctx.node}: {len(modules)} layers factorised, {n_before:,} -> {n:,} parameters")
        return BuildOutput(files=save_variant(model, scheme, modules), tokenizer=ctx.parent.row.tokenizer,
                           params=n, own_params=n, architecture={**base_architecture(ctx.parent.manifest),
                                                                 "variant": scheme})
