"""`distill`: a smaller student learns from its parent (the teacher) on the child's data.

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the child's tokens
(Hinton, Vinyals & Dean, 2015). When the widths match, the student starts from the teacher's embeddings and
from evenly spaced teacher blocks (as DistilBERT starts from every other layer; Sanh et al., 2019), which
makes a shallow student useful after few steps. Replay rows from the teacher's own data are distilled with
the KL term only, so the student keeps some of the teacher's general knowledge.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StemmaError
from ..models.arch import GPTConfig, build_gpt, count_params, model_context
from ..models.io import save_model_files
from ..models.tokenizer import eos_id
from .base import TrainConfig, Trainer, kl_to_teacher, lm_loss
from .forgetting import draw, split_batch
from .registry import BuildContext, BuildMethod, BuildOutput, register


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """A smaller GPT-2 student distilled from the parent."""

    n_layer: int = 2
    """Student blocks."""
    n_embd: int | None = None
    """Student width; default: the teacher's."""
    n_head: int | None = None
    """Student attention heads; default: the teacher's."""
    temperature: float = 2.0
    """Softmax temperature for the soft targets."""
    alpha: float = 0.5
    """Weight of the soft-target KL term; ``1 - alpha`` weights the hard-label loss."""
    init_from_teacher: bool = True
    """Start from the teacher's embeddings and evenly spaced blocks when shapes allow."""
    replay_fraction: float = 0.25
    """Share of each batch drawn from the teacher's own training data (KL term only)."""
    max_param_ratio: float = 0.5
    """Refuse a student larger than this fraction of the teacher's parameters."""


def _copy_from_teacher(student, teacher) -> list[int]:
    if getattr(teacher.config, "model_type", None) != "gpt2":
        return []
    ts, ss = teacher.transformer, student.transformer
    if ts.wte.weight.shape != ss.wte.weight.shape or ts.wpe.weight.shape != ss.wpe.weight.shape:
        return []
    picks = [int(i) for i in np.linspace(0, len(ts.h) - 1, len(ss.h)).round()]
    with torch.no_grad():
        ss.wte.weight.copy_(ts.wte.weight)
        ss.wpe.weight.copy_(ts.wpe.weight)
        ss.ln_f.load_state_dict(ts.ln_f.state_dict())
        for si, ti in enumerate(picks):
            ss.h[si].load_state_dict(ts.h[ti].state_dict())
    return picks


@register
class Distill(BuildMethod):
    name = "distill"
    relation = "distill"
    config_cls = DistillConfig

    def run(self, ctx: BuildContext, cfg: DistillConfig) -> BuildOutput:
        tok = ctx.parent_tokenizer()
        teacher = ctx.load_parent()
        for p in teacher.parameters():
            p.requires_grad_(False)
        tc = teacher.config
        width = cfg.n_embd or getattr(tc, "n_embd", None) or tc.hidden_size
        heads = cfg.n_head or getattr(tc, "n_head", None) or tc.num_attention_heads
        context = model_context(teacher)
        torch.manual_seed(cfg.seed)
        student = build_gpt(GPTConfig(n_layer=cfg.n_layer, n_embd=width, n_head=heads, context=context),
                            vocab_size=tc.vocab_size, eos_token_id=eos_id(tok))
        n_s, n_t = count_params(student), count_params(teacher)
        if n_s > cfg.max_param_ratio * n_t:
            raise StemmaError(f"node {ctx.node}: student has {n_s:,} parameters, more than {cfg.max_param_ratio:g} of "
                              f"the teacher's {n_t:,}; shrink n_layer/n_embd or raise max_param_ratio")
        picks = _copy_from_teacher(student, teacher) if cfg.init_from_teacher else []
        own, replay = ctx.streams(tok, context, cfg.seed)
        split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None)

        def step_loss(step: int):
            a, b = draw(own, replay, step, split)
            rows = a if b is None else torch.cat([a, b])
            x = rows[:, :-1]
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits
            s_logits = student(input_ids=x).logits
            soft = kl_to_teacher(s_logits, t_logits, cfg.temperature)
            hard = lm_loss(s_logits[: split.own], a[:, 1:])
            return cfg.alpha * soft + (1 - cfg.alpha) * hard, x.numel()

        stats = Trainer(student, cfg, step_loss, ctx.work_dir, ctx.reporter, label=f"{ctx.node}: distill").run()
        return BuildOutput(
            files=save_model_files(student), tokenizer=ctx.parent.row.tokenizer, params=n_s, own_params=n_s,
            architecture={"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": width, "n_head": heads,
                          "context": context, "vocab_size": tc.vocab_size, "init_teacher_layers": picks},
            train={"steps": stats.steps, "tokens": stats.tokens, "seconds": round(stats.seconds, 2),
                   "final_loss": round(stats.final_loss, 4), "teacher_params": n_t,
                   "config": dataclasses.asdict(cfg)},
        )
