"""`dpo`: Direct Preference Optimization on preference pairs, with the parent as the frozen reference.

Rafailov et al., 2023: for a prompt x with a preferred response y_w and a rejected one y_l,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) sums the log-probabilities of the response tokens (and its end-of-text token) given the prompt,
pi is the child being trained and ref the parent. ``beta`` times the log-ratio of child to parent is the implicit
reward; the loss widens the reward margin of preferred over rejected responses while the log-ratio keeps the child
near the parent. This is TRL's ``DPOTrainer`` sigmoid loss (``loss_type="sigmoid"``, no label smoothing), checked
equal on the same batch in the tests. The parent's log-probabilities do not change, so they are computed once
before training.

The held-out share of the pairs measures the result, for the child and for the parent: preference accuracy (the
share of pairs where log pi(y_w|x) > log pi(y_l|x)) and, for the child, the mean reward margin and the share of
positive margins (the parent's margin is 0 by definition). They go into the manifest's train statistics and are
stored as the metrics ``pref/accuracy`` and ``pref/margin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SpecError
from .align import (
    AlignConfig,
    AlignMethod,
    collate,
    encode,
    maybe_autocast,
    pick,
    prompt_text,
    response_text,
    token_logps,
)
from .base import Trainer
from .forgetting import split_batch
from .registry import BuildContext, BuildOutput, register


@dataclass(frozen=True)
class DpoConfig(AlignConfig):
    """Preference tuning of the parent on a pairs file (fields shared with `sft` in `AlignConfig`)."""

    steps: int = 100
    """Optimiser steps."""
    batch_size: int = 8
    """Pairs per step (each pair is two rows: preferred and rejected)."""
    lr: float = 5e-4
    """Peak learning rate (preference tuning moves less than instruction tuning)."""
    beta: float = 0.1
    """Strength of the pull towards the parent: the implicit reward is ``beta`` times the child's log-ratio to
    the parent (smaller lets the child move further)."""


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, per-pair reward margin) from summed response log-probabilities of child and parent."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -torch.nn.functional.logsigmoid(margin), margin


def sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens given what precedes them."""
    return token_logps(model(input_ids=ids[:, :-1]).logits, labels).sum(-1)


def encode_pair(tok, rec: dict, template: str, eos: int, max_len: int):
    """The preferred and the rejected response after the same prompt, as two (ids, labels) rows."""
    prompt = (prompt_text(rec["prompt"], template), False)
    out = []
    for side in ("chosen", "rejected"):
        ids, labels, _ = encode(tok, [prompt, (response_text(rec[side], template), True)], eos, max_len)
        out.append((ids, labels))
    return out


def pair_logps(model, pairs: list, pad: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probabilities for encoded pairs, without gradient."""
    ch, rj = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            ids, labels = collate([p[0] for p in chunk] + [p[1] for p in chunk], pad)
            lp = sequence_logps(model, ids, labels)
            ch.append(lp[: len(chunk)])
            rj.append(lp[len(chunk) :])
    return (torch.cat(ch), torch.cat(rj)) if pairs else (torch.empty(0), torch.empty(0))


@register
class Dpo(AlignMethod):
    name = "dpo"
    kind = "dpo"
    config_cls = DpoConfig

    def make_config(self, raw, where: str) -> DpoConfig:
        cfg = super().make_config(raw, where)
        if cfg.beta <= 0:
            raise SpecError(f"{where} (method {self.name}): beta must be > 0")
        return cfg

    def run(self, ctx: BuildContext, cfg: DpoConfig) -> BuildOutput:
        st = self.start(ctx, cfg)
        model = st.policy.model
        pairs = [encode_pair(st.tok, r, cfg.template, st.eos, st.context + 1) for r in st.train]
        held_pairs = [encode_pair(st.tok, r, cfg.template, st.eos, st.context + 1) for r in st.held]
        replay = st.policy.replay_stream(st.tok, st.context)
        split = split_batch(cfg.batch_size, cfg.replay_fraction, replay is not None)
        # Before any step the child is the parent: its log-probabilities are the reference, once for all steps
        # (at the training precision, so the first step's margins are 0 up to rounding), and in fp32 for the
        # held-out pairs, which are measured in fp32 after training too.
        with st.policy.no_grad_eval():
            with maybe_autocast(cfg):
                ref_c, ref_r = pair_logps(model, pairs, st.eos)
            held_ref = pair_logps(model, held_pairs, st.eos) if held_pairs else None

        def step_loss(step: int):
            idx = pick(len(pairs), split.own, cfg.seed, step)
            chunk = [pairs[i] for i in idx]
            ids, labels = collate([p[0] for p in chunk] + [p[1] for p in chunk], st.eos)
            lp = sequence_logps(model, ids, labels)
            t = torch.from_numpy(idx)
            loss = dpo_loss(lp[: len(chunk)], lp[len(chunk) :], ref_c[t], ref_r[t], cfg.beta)[0].mean()
            return st.policy.step_total(loss, int(ids.numel()), step, replay, split.replay)

        stats = Trainer(model, cfg, step_loss, ctx.work_dir, ctx.reporter,
                        label=f"{ctx.node}: dpo ({cfg.mode})").run()
        info = st.policy.train_info(stats, st.digest, len(pairs), len(held_pairs))
        metrics = {}
        if held_pairs:
            with st.policy.no_grad_eval():
                c, r = pair_logps(model, held_pairs, st.eos)
            pref = preference_stats(c, r, *held_ref, cfg.beta)
            info |= pref
            details = {"pairs": st.digest, "n": len(held_pairs), "beta": cfg.beta}
            metrics = {"pref/accuracy": (pref["pref_accuracy"], {**details,
                                                                 "parent": pref["parent_pref_accuracy"]}),
                       "pref/margin": (pref["reward_margin"], {**details, "parent": 0.0,
                                                               "reward_accuracy": pref["reward_accuracy"]})}
        return st.policy.output(info, metrics)


def preference_stats(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """Held-out preference numbers of a child against its parent (see the module docstring)."""
    _, margin = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    return {"pref_accuracy": round(float((chosen > rejected).float().mean()), 4),
            "parent_pref_accuracy": round(float((ref_chosen > ref_rejected).float().mean()), 4),
            "reward_margin": round(float(margin.mean()), 4),
            "reward_accuracy": round(float((margin > 0).float().mean()), 4)}
