"""`pruned`: weights of the parent removed by magnitude, one by one or in whole heads and neurons.

``unstructured``: in every linear layer the ``sparsity`` share of weights with the smallest magnitude is set to
zero (Han et al., 2015, "Learning both weights and connections for efficient neural networks"); the layer is
stored as a bit mask plus its remaining values and densified on load.
``structured``: whole MLP neurons (by the norm of their in- and out-going weights) and whole attention heads
(by the norm of their output projection) are removed (Michel et al., 2019, "Are sixteen heads really better
than one?"; Voita et al., 2019), as the model's family allows (`Family.prune_structured`). Removed neurons shrink
the MLP for real in every family. GPT-2's heads are zeroed, since its attention needs a uniform head count; the
Llama layout loses whole KV groups for real (a key/value head with the query heads sharing it), so the result
is a plain, smaller model either way. An optional short recovery fine-tune on the parent's data, distilling from
the parent, wins back part of the loss (Sanh et al., 2020, "Movement pruning" use the same teacher signal);
zeroed heads stay zero through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import SpecError
from ..models.arch import count_params, model_context
from ..models.io import save_model_files
from ..train.base import TokenStream, Trainer, kl_to_teacher, lm_loss
from ..train.registry import BuildContext, BuildOutput, Planned, register
from . import Compression
from .layers import base_architecture, is_linear, output_name, pack_sparse, save_variant


@dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning of the parent, unstructured or by heads and neurons."""

    mode: Literal["unstructured", "structured"] = "unstructured"
    """``unstructured``: single weights; ``structured``: whole MLP neurons and attention heads."""
    sparsity: float = 0.5
    """Unstructured: share of each linear layer's weights set to zero."""
    values_dtype: Literal["float32", "float16"] = "float32"
    """Unstructured: storage type of the weights that remain."""
    neurons: float = 0.25
    """Structured: share of MLP neurons removed in every block."""
    heads: float = 0.0
    """Structured: share of attention heads removed in every block, rounded down (GPT-2: heads, zeroed; Llama
    layout: whole KV groups); a share that rounds to no head is refused."""
    recovery_steps: int = 0
    """Structured: steps of recovery fine-tuning on the parent's data (0: none)."""
    batch_size: int = 8
    """Recovery fine-tune: sequences per step."""
    lr: float = 3e-4
    """Recovery fine-tune: peak learning rate."""
    seed: int = 0
    """Recovery fine-tune: seed of batch sampling."""


def prune_unstructured(model: torch.nn.Module, sparsity: float) -> list[str]:
    """Zero the smallest-magnitude ``sparsity`` share of every linear layer (output head excepted); their names."""
    head = output_name(model)
    names = []
    for name, m in model.named_modules():
        if not is_linear(m) or name == head:
            continue
        w = m.weight.data
        k = int(sparsity * w.numel())
        if k < 1:
            continue
        threshold = w.abs().reshape(-1).kthvalue(k).values
        w.mul_((w.abs() > threshold).to(w.dtype))
        names.append(name)
    return names


def prune_structured(model: torch.nn.Module, neurons: float, heads: float) -> dict[str, list[torch.Tensor]]:
    """Remove MLP neurons and attention heads in the way the model's family allows; returns gradient masks for what
    had to be zeroed rather than removed (see `stemma.models.families.Family.prune_structured`)."""
    from ..models import families

    return families.of(model.config).prune_structured(model, neurons, heads)


@register
class Prune(Compression):
    name = "pruned"
    relation = "pruned"
    config_cls = PruneConfig

    def make_config(self, raw, where):
        cfg = super().make_config(raw, where)
        for field in ("sparsity", "neurons", "heads"):
            if not 0 <= getattr(cfg, field) < 1:
                raise SpecError(f"{where}: pruned {field} must be in [0, 1)")
        if cfg.mode == "unstructured" and cfg.recovery_steps:
            raise SpecError(f"{where}: recovery_steps applies to structured pruning only")
        return cfg

    def plan(self, cfg: PruneConfig, parent, spec, node) -> Planned:
        planned = super().plan(cfg, parent, spec, node)
        parent_data = spec.nodes[node.parent].dataset if node.parent in spec.nodes else None
        if cfg.mode == "structured" and cfg.recovery_steps and not (node.dataset or parent_data):
            raise SpecError(f"node {node.path}: recovery fine-tuning needs data; the parent has no dataset")
        if cfg.mode == "structured":  # plain weights of a smaller shape than the parent's
            return Planned(None)
        return planned

    def run(self, ctx: BuildContext, cfg: PruneConfig) -> BuildOutput:
        model = ctx.load_parent()
        arch = base_architecture(ctx.parent.manifest)
        if cfg.mode == "unstructured":
            names = prune_unstructured(model, cfg.sparsity)
            dtype = getattr(torch, cfg.values_dtype)
            modules, packed = {}, {}
            for name in names:
                w = model.get_submodule(name).weight.data
                modules[name] = {"kind": "sparse", "shape": list(w.shape)}
                for k, t in pack_sparse(w, dtype).items():
                    packed[f"{name}.weight.{k}"] = t
            n = count_params(model)
            nonzero = n - sum(int((model.get_submodule(x).weight == 0).sum()) for x in names)
            scheme = {"method": self.name, "mode": cfg.mode, "sparsity": cfg.sparsity, "values": cfg.values_dtype}
            ctx.reporter.log(f"{ctx.node}: {len(names)} layers pruned to {cfg.sparsity:.0%} sparsity")
            return BuildOutput(files=save_variant(model, scheme, modules, packed), tokenizer=ctx.parent.row.tokenizer,
                               params=n, own_params=nonzero, architecture={**arch, "variant": scheme})
        masks = prune_structured(model, cfg.neurons, cfg.heads)
        train = self._recover(ctx, cfg, model, masks) if cfg.recovery_steps else {}
        n = count_params(model)
        from ..models import families

        shape = families.of(model.config).describe(model.config)  # the pruned shape, not the parent's
        scheme = {"method": self.name, "mode": cfg.mode, "neurons": cfg.neurons, "heads": cfg.heads,
                  "n_inner": shape["n_inner"], "n_kv_head": shape["n_kv_head"], "recovery_steps": cfg.recovery_steps}
        ctx.reporter.log(f"{ctx.node}: structured pruning, MLP width {shape['n_inner']}, {shape['n_kv_head']} KV "
                         f"heads, {n:,} parameters")
        return BuildOutput(files=save_model_files(model), tokenizer=ctx.parent.row.tokenizer, params=n, own_params=n,
                           architecture={**arch, **shape, "variant": scheme}, train=train)

    def _recover(self, ctx: BuildContext, cfg: PruneConfig, model, masks) -> dict:
        """A short fine-tune of the pruned model towards the parent's predictions on the parent's data."""
        from ..train.base import TrainConfig

        data_id = ctx.dataset_id or ctx.replay_dataset_id
        if data_id is None:
            raise SpecError(f"node {ctx.node}: recovery fine-tuning needs data; the parent has no dataset")
        teacher = ctx.load_parent()
        for p in teacher.parameters():
            p.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(True)
            if name in masks:
                mask = masks[name][0]
                p.register_hook(lambda g, m=mask: g * m)  # zeroed heads get no gradient, so they stay zero
        tcfg = TrainConfig(steps=cfg.recovery_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                           warmup=max(1, cfg.recovery_steps // 10))
        stream = TokenStream.from_texts(ctx.parent_tokenizer(), ctx.texts("train", data_id), model_context(model),
                                        cfg.seed, name="parent's dataset")

        def step_loss(step: int):
            b = stream.batch(step, cfg.batch_size)
            logits = model(input_ids=b[:, :-1]).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=b[:, :-1]).logits
            return lm_loss(logits, b[:, 1:]) + kl_to_teacher(logits, t_logits), b[:, 1:].numel()

        stats = Trainer(model, tcfg, step_loss, ctx.work_dir, ctx.reporter, label=f"{ctx.node}: recovery").run()
        model.eval()
        return {"steps": stats.steps, "tokens": stats.tokens, "seconds": round(stats.seconds, 2),
                "final_loss": round(stats.final_loss, 4)}
