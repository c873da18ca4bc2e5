"""`distill`: a smaller student learns from its parent (the teacher) on the child's data.

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the child's tokens
(Hinton, Vinyals & Dean, 2015). The student is of the teacher's model family unless ``arch`` names another (the
tokenizer is shared either way). When the shapes match, it starts from the teacher's embeddings and from evenly
spaced teacher blocks (as DistilBERT starts from every other layer; Sanh et al., 2019), which
makes a shallow student useful after few steps. Replay rows from the teacher's own data are distilled with
the KL term only, so the student keeps some of the teacher's general knowledge.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import SpecError, StemmaError
from ..models import families
from ..models.arch import count_params, model_context
from ..models.families import ArchConfig
from ..models.io import save_model_files
from ..models.tokenizer import eos_id
from .base import TrainConfig, Trainer, kl_to_teacher, lm_loss
from .forgetting import draw, split_batch
from .registry import BuildContext, BuildMethod, BuildOutput, Planned, meta_params, register


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """A smaller student distilled from the parent."""

    n_layer: int = 2
    """Student blocks."""
    n_embd: int | None = None
    """Student width; default: the teacher's."""
    n_head: int | None = None
    """Student attention heads; default: the teacher's."""
    n_kv_head: int | None = None
    """Student key/value heads (llama); default: the teacher's (or ``n_head`` if that no longer divides)."""
    n_inner: int | None = None
    """Student MLP width; default: the teacher's (the family's default when ``n_embd`` changes)."""
    arch: str | None = None
    """Student model family; default: the teacher's. Another family starts from scratch (no teacher blocks)."""
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


def student_config(teacher_config, cfg: DistillConfig, eos_token_id: int):
    """(the student's Hugging Face config, its family): the teacher's family with the student's shape, or a fresh
    model of ``cfg.arch``; refuses (one line) a shape the family does not implement."""
    t_family = families.of(teacher_config)
    family = families.get(cfg.arch) if cfg.arch else t_family
    if family is t_family:
        student_cfg = family.student_config(teacher_config, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head,
                                            cfg.n_inner)
    else:
        t = t_family.describe(teacher_config)
        shape = ArchConfig(arch=family.name, n_layer=cfg.n_layer, n_embd=cfg.n_embd or t["n_embd"],
                           n_head=cfg.n_head or t["n_head"], n_kv_head=cfg.n_kv_head, n_inner=cfg.n_inner,
                           context=t["context"], tie_embeddings=t.get("tie_embeddings", True))
        shape.check()
        student_cfg = family.hf_config(shape, teacher_config.vocab_size, eos_token_id)
    family.check(student_cfg)
    return student_cfg, family


def make_student(teacher, cfg: DistillConfig, eos_token_id: int):
    """(student, its family), initialised at random (`init_student` copies teacher weights in)."""
    from transformers import AutoModelForCausalLM

    student_cfg, family = student_config(teacher.config, cfg, eos_token_id)
    return AutoModelForCausalLM.from_config(student_cfg), family


def too_large(n_student: int, n_teacher: int, cfg: DistillConfig) -> str | None:
    if n_student <= cfg.max_param_ratio * n_teacher:
        return None
    return (f"student has {n_student:,} parameters, more than {cfg.max_param_ratio:g} of the teacher's "
            f"{n_teacher:,}; shrink n_layer/n_embd or raise max_param_ratio")


@register
class Distill(BuildMethod):
    name = "distill"
    relation = "distill"
    config_cls = DistillConfig
    data_parallel = True

    def make_config(self, raw, where):
        cfg = super().make_config(raw, where)
        if cfg.arch is not None:
            try:
                families.get(cfg.arch)
            except StemmaError as e:
                raise SpecError(f"{where}: {e}") from None
        if cfg.n_layer < 1:
            raise SpecError(f"{where}: n_layer must be at least 1")
        if not 0 < cfg.max_param_ratio <= 1:
            raise SpecError(f"{where}: max_param_ratio must be in (0, 1]: a student is smaller than its teacher")
        return cfg

    def plan(self, cfg: DistillConfig, parent: Planned | None, spec, node) -> Planned:
        """The student's config from the teacher's, refused here when its family cannot build it or it is too
        large: before the teacher (or anything) trains."""
        if parent is None or parent.config is None:
            return Planned(None)
        try:
            student, _ = student_config(parent.config, cfg, getattr(parent.config, "eos_token_id", None) or 0)
        except StemmaError as e:
            raise SpecError(f"node {node.path}: {e}") from None
        problem = too_large(meta_params(student), meta_params(parent.config), cfg)
        if problem:
            raise SpecError(f"node {node.path}: {problem}")
        return Planned(student)

    def run(self, ctx: BuildContext, cfg: DistillConfig) -> BuildOutput:
        tok = ctx.parent_tokenizer()
        teacher = ctx.load_parent()
        for p in teacher.parameters():
            p.requires_grad_(False)
        context = model_context(teacher)
        torch.manual_seed(cfg.seed)
        student, family = make_student(teacher, cfg, eos_id(tok))
        n_s, n_t = count_params(student), count_params(teacher)
        problem = too_large(n_s, n_t, cfg)  # pre-flight checked it on the planned shapes; this is the trained teacher
        if problem:
            raise StemmaError(f"node {ctx.node}: {problem}")
        same = family is families.of(teacher.config)
        picks = family.init_student(student, teacher) if cfg.init_from_teacher and same else []
        own, replay = ctx.streams(tok, context, cfg.seed)
        split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None)
        net = ctx.world.wrap(student)

        def step_loss(step: int):
            a, b = draw(own, replay, step, split, ctx.world)
            rows = a if b is None else torch.cat([a, b])
            x = rows[:, :-1]
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits
            s_logits = net(input_ids=x).logits
            soft = kl_to_teacher(s_logits, t_logits, cfg.temperature)
            hard = lm_loss(s_logits[: len(a)], a[:, 1:])
            return cfg.alpha * soft + (1 - cfg.alpha) * hard, x.numel()

        stats = Trainer(net, cfg, step_loss, ctx.work_dir, ctx.reporter, label=f"{ctx.node}: distill",
                        world=ctx.world).run()
        return BuildOutput(
            files=save_model_files(student), tokenizer=ctx.parent.row.tokenizer, params=n_s, own_params=n_s,
            architecture={**family.describe(student.config), "init_teacher_layers": picks},
            train={**stats.record(), "teacher_params": n_t,
                   "config": dataclasses.asdict(cfg)},
        )
