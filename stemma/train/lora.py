"""`lora`: a low-rank adapter on the parent (Hu et al., 2021), stored as the delta only.

The parent is loaded with its own adapter chain merged, a fresh PEFT LoRA adapter is trained on top, and
only the adapter's weights go into the store, pointing at the parent version as base. Replay rows from the
parent's data are pulled towards the parent's predictions, which PEFT gives for free by disabling the
adapter (no second copy of the model in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SpecError
from ..models import families
from ..models.arch import count_params, model_context
from ..models.io import save_model_files
from .base import TrainConfig, Trainer, kl_to_teacher, lm_loss
from .forgetting import draw, split_batch
from .registry import BuildContext, BuildMethod, BuildOutput, Planned, register


def check_lora(config, r: int, target_modules, where: str) -> None:
    """Refuse (one line) a LoRA the parent's architecture cannot take: target modules that name none of its linear
    layers, or a rank beyond the width of a layer it adapts. Reads the config alone (a model on ``meta``)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    family = families.of(config)
    targets = list(target_modules or family.lora_targets)
    if r < 1:
        raise SpecError(f"{where}: LoRA rank r must be at least 1")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    names = sorted({n.rsplit(".", 1)[-1] for n in linears if n.startswith(("model.", "transformer."))})
    widths = []
    for t in targets:
        hit = [m for n, m in linears.items() if n == t or n.endswith("." + t)]
        if not hit:
            raise SpecError(f"{where}: target module {t!r} is no linear layer of this {family.name} model "
                            f"(its linear layers: {', '.join(names)})")
        widths += [min(m.weight.shape) for m in hit]
    if r > min(widths):
        raise SpecError(f"{where}: LoRA rank r={r} is beyond the width of the layers it adapts ({min(widths)})")


@dataclass(frozen=True)
class LoraConfig(TrainConfig):
    """A LoRA adapter on the parent."""

    lr: float = 2e-3
    """Peak learning rate (adapters tolerate a higher one)."""
    r: int = 8
    """Rank of the update."""
    alpha: int = 16
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """Module names to adapt; default: every attention and MLP projection of the model's family."""
    replay_fraction: float = 0.25
    """Share of each batch drawn from the parent's own training data."""
    replay_kl: float = 1.0
    """Weight of KL(parent || child) on the replay rows."""


@register
class Lora(BuildMethod):
    name = "lora"
    relation = "adapter"
    config_cls = LoraConfig
    data_parallel = True

    def plan(self, cfg: LoraConfig, parent: Planned | None, spec, node) -> Planned:
        planned = super().plan(cfg, parent, spec, node)  # refuses a compressed parent first
        if parent is not None and parent.config is not None:
            check_lora(parent.config, cfg.r, cfg.target_modules, f"node {node.path}")
        return planned

    def batch_parts(self, cfg: LoraConfig) -> dict[str, int]:
        split = split_batch(cfg.batch_size, cfg.replay_fraction, cfg.replay_kl > 0)
        return {"own": split.own, "replay": split.replay}

    def run(self, ctx: BuildContext, cfg: LoraConfig) -> BuildOutput:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        tok = ctx.parent_tokenizer()
        base = ctx.load_parent()
        family = families.of(base.config)
        targets = list(cfg.target_modules or family.lora_targets)
        n_base = count_params(base)
        torch.manual_seed(cfg.seed)
        peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                                  fan_in_fan_out=family.lora_fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, peft_cfg)
        context = model_context(base)
        own, replay = ctx.streams(tok, context, cfg.seed)
        split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None and cfg.replay_kl > 0)
        net = ctx.world.wrap(model)

        def step_loss(step: int):
            a, b = draw(own, replay, step, split, ctx.world)
            if b is None:
                return lm_loss(net(input_ids=a[:, :-1]).logits, a[:, 1:]), a[:, 1:].numel()
            logits = net(input_ids=torch.cat([a, b])[:, :-1]).logits
            loss = lm_loss(logits[: len(a)], a[:, 1:])
            with torch.no_grad(), model.disable_adapter():
                p_logits = model(input_ids=b[:, :-1]).logits
            loss = loss + cfg.replay_kl * kl_to_teacher(logits[len(a) :], p_logits)
            return loss, a[:, 1:].numel() + b[:, 1:].numel()

        stats = Trainer(net, cfg, step_loss, ctx.work_dir, ctx.reporter, label=f"{ctx.node}: lora r={cfg.r}",
                        world=ctx.world).run()
        delta = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        return BuildOutput(
            files=save_model_files(model, adapter=True, base_ref=f"stemma:{ctx.parent.id}"),
            tokenizer=ctx.parent.row.tokenizer, params=n_base, own_params=delta,
            architecture={**ctx.parent.manifest["architecture"], "adapter": {"type": "lora", "r": cfg.r,
                                                                              "alpha": cfg.alpha, "targets": targets}},
            train=stats.record(),
        )
