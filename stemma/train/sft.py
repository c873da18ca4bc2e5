"""`sft`: supervised fine-tuning on instruction/response pairs, the loss on response tokens only.

The parent learns to answer the prompts of a pairs file (`stemma.train.align`: ``{"prompt", "response"}`` or chat
``messages``) as a LoRA adapter (default) or with all weights, by cross-entropy on the response tokens alone: the
prompt is context, not a target (Ouyang et al., 2022; Wei et al., 2022). A share of every batch replays the
parent's text with KL to the parent, and L2-SP is available, as for the other derived methods. The held-out share
of the pairs measures the result: the mean response loss of the child and of the parent on the same pairs, in the
manifest's train statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .align import IGNORE, AlignConfig, AlignMethod, collate, encode, pick, render_sft, token_logps
from .base import Trainer
from .forgetting import split_batch
from .registry import BuildContext, BuildOutput, register


@dataclass(frozen=True)
class SftConfig(AlignConfig):
    """Instruction tuning of the parent on a pairs file (fields shared with `dpo` in `AlignConfig`)."""

    steps: int = 100
    """Optimiser steps."""


def response_loss(logits: torch.Tensor, labels: torch.Tensor, over: float | None = None) -> tuple[torch.Tensor, int]:
    """(cross-entropy summed over the labelled next tokens and divided by ``over``, how many there were). ``over``
    defaults to their count: the mean."""
    targets = labels[:, 1:]
    n = int((targets != IGNORE).sum())
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss / max(over if over is not None else n, 1), n


def labelled(rows: list[tuple[list[int], list[int]]]) -> int:
    """How many next tokens of encoded examples carry a label (what `response_loss` averages over)."""
    return sum(sum(t != IGNORE for t in labels[1:]) for _, labels in rows)


def mean_response_loss(model, rows: list[tuple[list[int], list[int]]], pad: int, batch: int = 16) -> float:
    """Mean per-token response loss of ``model`` over encoded examples (no gradient; the caller sets eval mode)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids, labels = collate(rows[i : i + batch], pad)
        logp = token_logps(model(input_ids=ids[:, :-1]).logits, labels)
        total -= float(logp.sum())
        count += int((labels[:, 1:] != IGNORE).sum())
    return total / max(count, 1)


@register
class Sft(AlignMethod):
    name = "sft"
    kind = "sft"
    config_cls = SftConfig
    data_parallel = True

    def batch_parts(self, cfg: SftConfig) -> dict[str, int]:
        split = split_batch(cfg.batch_size, cfg.replay_fraction, cfg.replay_kl > 0)
        return {"own": split.own, "replay": split.replay}

    def run(self, ctx: BuildContext, cfg: SftConfig) -> BuildOutput:
        st = self.start(ctx, cfg)
        model = st.policy.model
        encoded = [encode(st.tok, render_sft(r, cfg.template), st.eos, st.context + 1) for r in st.train]
        rows = [(ids, labels) for ids, labels, _ in encoded]
        held_rows = [(ids, labels) for ids, labels, _ in
                     (encode(st.tok, render_sft(r, cfg.template), st.eos, st.context + 1) for r in st.held)]
        replay = st.policy.replay_stream(st.tok, st.context)
        split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None)
        with st.policy.no_grad_eval():
            parent_held = mean_response_loss(model, held_rows, st.eos) if held_rows else None

        world = ctx.world

        def step_loss(step: int):
            picked = [rows[i] for i in pick(len(rows), split.own, cfg.seed, step)]
            ids, labels = collate(world.share(picked), st.eos)
            # The whole batch's mean over its labelled tokens: each process divides its sum by the batch's count
            # over the processes, since the gradient reduction averages over them.
            over = labelled(picked) / world.size
            loss, ntok = response_loss(st.policy.net(input_ids=ids[:, :-1]).logits, labels, over)
            return st.policy.step_total(loss, ntok, step, replay, split.replay)

        stats = Trainer(st.policy.net, cfg, step_loss, ctx.work_dir, ctx.reporter,
                        label=f"{ctx.node}: sft ({cfg.mode})", world=world).run()
        with st.policy.no_grad_eval():
            child_held = mean_response_loss(model, held_rows, st.eos) if held_rows else None
        info = st.policy.train_info(stats, st.digest, len(rows), len(held_rows))
        info["truncated"] = sum(t for _, _, t in encoded)
        if held_rows:
            info |= {"heldout_loss": round(child_held, 4), "parent_heldout_loss": round(parent_held, 4)}
        return st.policy.output(info)
