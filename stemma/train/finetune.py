"""`finetune`: full fine-tuning of a copy of the parent on the child's data, with forgetting control."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..models.arch import count_params, model_context
from ..models.io import save_model_files
from .base import TrainConfig, Trainer, kl_to_teacher, lm_loss
from .forgetting import L2SP, draw, split_batch
from .registry import BuildContext, BuildMethod, BuildOutput, register


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """All weights of a copy of the parent trained on the child's data."""

    lr: float = 3e-4
    """Peak learning rate (lower than pretraining: the model starts trained)."""
    replay_fraction: float = 0.25
    """Share of each batch drawn from the parent's own training data."""
    replay_kl: float = 1.0
    """Weight of KL(parent || child) on the replay rows."""
    l2sp: float = 0.0
    """Weight of the L2-SP penalty pulling weights towards the parent's."""


@register
class Finetune(BuildMethod):
    name = "finetune"
    relation = "finetune"
    config_cls = FinetuneConfig
    data_parallel = True

    def run(self, ctx: BuildContext, cfg: FinetuneConfig) -> BuildOutput:
        tok = ctx.parent_tokenizer()
        model = ctx.load_parent()
        context = model_context(model)
        own, replay = ctx.streams(tok, context, cfg.seed)
        split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None)
        parent = None
        if split.replay and cfg.replay_kl > 0:
            parent = copy.deepcopy(model).eval()
            for p in parent.parameters():
                p.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(True)
        l2sp = L2SP(model.named_parameters()) if cfg.l2sp > 0 else None
        net = ctx.world.wrap(model)

        def step_loss(step: int):
            a, b = draw(own, replay, step, split, ctx.world)
            if parent is not None and b is not None:
                logits = net(input_ids=torch.cat([a, b])[:, :-1]).logits
                loss = lm_loss(logits[: len(a)], a[:, 1:])
                with torch.no_grad():
                    p_logits = parent(input_ids=b[:, :-1]).logits
                loss = loss + cfg.replay_kl * kl_to_teacher(logits[len(a) :], p_logits)
                ntok = a[:, 1:].numel() + b[:, 1:].numel()
            else:
                rows = a if b is None else torch.cat([a, b])
                loss = lm_loss(net(input_ids=rows[:, :-1]).logits, rows[:, 1:])
                ntok = rows[:, 1:].numel()
            if l2sp is not None:
                loss = loss + cfg.l2sp * l2sp()
            return loss, ntok

        stats = Trainer(net, cfg, step_loss, ctx.work_dir, ctx.reporter, label=f"{ctx.node}: finetune",
                        world=ctx.world).run()
        n = count_params(model)
        return BuildOutput(
            files=save_model_files(model), tokenizer=ctx.parent.row.tokenizer, params=n, own_params=n,
            architecture=ctx.parent.manifest["architecture"],
            train=stats.record(),
        )
