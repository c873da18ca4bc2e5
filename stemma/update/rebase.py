"""Rebase: re-fit a LoRA child onto a new version of its parent, distilling from the child's previous version.

When a parent accepts an update its adapter children are stale: their deltas were learnt against the old
weights. Retraining repeats the whole fine-tune. A rebase starts from the old adapter's weights on the new
parent and trains for a fraction of the steps on the child's own data, pulled towards the old child's
predictions (KL at a temperature, mixed with the hard-label loss) and, on replay rows, towards the new
parent's (the usual forgetting control). The old child is the teacher, so the specialisation it had is
what the new adapter learns back.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from ..configs import RebaseConfig
from ..errors import StemmaError
from ..models.arch import model_context
from ..models.io import save_model_files
from ..train.base import Trainer, kl_to_teacher, lm_loss
from ..train.forgetting import draw, split_batch
from ..train.registry import BuildContext, BuildOutput


def comparable(recipe: dict) -> dict:
    """The parts of a recipe a rebase must share with the version it starts from (all but the parent)."""
    return {"node": recipe.get("node"), "method": recipe.get("method"), "config": recipe.get("config"),
            "train": (recipe.get("datasets") or {}).get("train")}


def run_rebase(ctx: BuildContext, cfg, rb: RebaseConfig, old) -> BuildOutput:
    """Train the rebased adapter; ``cfg`` is the node's `LoraConfig`, ``old`` the child's previous version."""
    from peft import PeftModel

    if ctx.parent.row.tokenizer != old.row.tokenizer:
        raise StemmaError(f"{ctx.node}: the new parent uses another tokenizer; rebase impossible, retrain instead")
    tok = ctx.parent_tokenizer()
    base = ctx.load_parent()
    teacher = ctx.ws.load_model(old.id) if rb.alpha > 0 else None
    with tempfile.TemporaryDirectory(prefix="stemma-rebase-") as d:
        adapter = ctx.ws.materialise(ctx.ws.plan(old.id).version, Path(d))
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    steps = max(1, round(cfg.steps * rb.steps_fraction))
    tcfg = dataclasses.replace(cfg, steps=steps, lr=cfg.lr * rb.lr_scale, warmup=min(cfg.warmup, max(1, steps // 10)))
    context = model_context(base)
    own, replay = ctx.streams(tok, context, cfg.seed + 1)
    split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None and cfg.replay_kl > 0)

    def step_loss(step: int):
        a, b = draw(own, replay, step, split)
        rows = a if b is None else torch.cat([a, b])
        logits = model(input_ids=rows[:, :-1]).logits
        own_logits = logits[: split.own]
        loss = (1 - rb.alpha) * lm_loss(own_logits, a[:, 1:])
        if rb.alpha > 0:
            with torch.no_grad():
                t_logits = teacher(input_ids=a[:, :-1]).logits
            loss = loss + rb.alpha * kl_to_teacher(own_logits, t_logits, rb.temperature)
        if b is not None:
            with torch.no_grad(), model.disable_adapter():
                p_logits = model(input_ids=b[:, :-1]).logits
            loss = loss + cfg.replay_kl * kl_to_teacher(logits[split.own:], p_logits)
        return loss, rows[:, 1:].numel()

    stats = Trainer(model, tcfg, step_loss, ctx.work_dir, ctx.reporter,
                    label=f"{ctx.node}: rebase onto {ctx.parent.short} ({steps} steps)").run()
    delta = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return BuildOutput(
        files=save_model_files(model, adapter=True, base_ref=f"stemma:{ctx.parent.id}"),
        tokenizer=ctx.parent.row.tokenizer, params=old.row.params, own_params=delta,
        architecture={**ctx.parent.manifest["architecture"], "adapter": old.manifest["architecture"].get("adapter")},
        train={"steps": stats.steps, "tokens": stats.tokens, "seconds": round(stats.seconds, 2),
               "final_loss": round(stats.final_loss, 4), "rebased_from": old.id},
    )
