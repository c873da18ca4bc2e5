"""Forgetting control shared by the methods that derive a child from a parent.

Two regularisers keep a child's general knowledge:
- replay distillation: a share of every batch comes from the parent's own training data, and on those rows
  the child is pulled towards the parent's predictions with KL(parent || child) (as in "Learning without
  Forgetting", Li & Hoiem 2016, with replay instead of only new-task inputs);
- L2-SP: a penalty on the distance of the weights from the parent's (Li, Grandvalet & Davoine, 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TokenStream
from .parallel import ONE, World


@dataclass(frozen=True)
class ReplaySplit:
    own: int
    replay: int


def split_batch(batch_size: int, replay_fraction: float, has_replay: bool) -> ReplaySplit:
    if not has_replay or replay_fraction <= 0:
        return ReplaySplit(batch_size, 0)
    replay = max(1, round(batch_size * replay_fraction))
    return ReplaySplit(max(1, batch_size - replay), replay)


def draw(own: TokenStream, replay: TokenStream | None, step: int, split: ReplaySplit, world: World = ONE):
    """Own rows and replay rows for one step (replay drawn from its own seeded stream), this process's share of
    each: the parts are shared separately, so every process's loss weighs own and replay rows as the whole batch
    does."""
    a = world.share(own.batch(step, split.own, stream=0))
    b = world.share(replay.batch(step, split.replay, stream=1)) if (replay is not None and split.replay) else None
    return a, b


class L2SP:
    """Squared distance of the trainable weights from their starting point."""

    def __init__(self, named_params):
        self.ref = [(p, p.detach().clone()) for _, p in named_params if p.requires_grad]

    def __call__(self) -> torch.Tensor:
        return sum(((p - p0) ** 2).sum() for p, p0 in self.ref)
