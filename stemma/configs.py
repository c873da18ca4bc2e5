"""Reading a config mapping from stemma.yaml into its dataclass, with one-line errors.

Build methods, gates and rebase settings are frozen dataclasses documented field by field; this is the one
place that validates a mapping against them (pydantic for the types, unknown keys named with the known ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError


def parse_dataclass(cls: type, raw: dict[str, Any] | None, where: str, what: str = "config") -> Any:
    """``cls(**raw)`` validated: unknown fields and bad types raise `SpecError` naming ``where`` and the field."""
    from pydantic import TypeAdapter, ValidationError

    if raw is not None and not isinstance(raw, dict):
        raise SpecError(f"{where}: {what} must be a mapping, got {type(raw).__name__}")
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{where}: unknown {what} field(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(sorted(known))})")
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SpecError(f"{where}: {what} field {loc}: {err['msg']}") from None


# ---------------------------------------------------------------------------------------------- per-node settings
# The gate and rebase settings of a node in stemma.yaml (`stemma.update.gate`, `stemma.update.rebase` act on them).
@dataclass(frozen=True)
class GateConfig:
    """How a node aggregates updates and decides whether to accept the result."""

    strategy: str = "trimmed_mean"
    """Aggregation strategy by name (`stemma.update.strategies`): fedavg, median, trimmed_mean, krum, multikrum."""
    strategy_config: dict[str, Any] = field(default_factory=dict)
    """The strategy's own settings (for example ``{trim: 0.2, clip: median}``)."""
    min_contributors: int = 3
    """Distinct contributors a round needs."""
    server_lr: float = 1.0
    """The aggregate is scaled by this before it is added to the node."""
    min_heldout_gain: float = 0.0
    """Required relative drop of perplexity on the contributors' held-out data (0.01 = 1% lower; 0 = any drop)."""
    max_own_rise: float = 0.02
    """Largest relative rise of perplexity on the node's own test split."""
    max_child_rise: float = 0.05
    """Largest relative rise of the node's perplexity on any child's test split."""
    adapter_rank: int = 0
    """For an adapter node: rank added to hold the aggregate (truncated SVD); 0 = the adapter's own rank."""
    eval_tokens: int = 16384
    """Tokens of each test split the gate evaluates on."""


def make_gate(raw: dict[str, Any] | None, where: str) -> GateConfig:
    cfg = parse_dataclass(GateConfig, raw, where, "gate")
    if cfg.min_contributors < 1:
        raise SpecError(f"{where}: gate min_contributors must be >= 1")
    if cfg.server_lr <= 0:
        raise SpecError(f"{where}: gate server_lr must be > 0")
    if cfg.max_own_rise < 0 or cfg.max_child_rise < 0:
        raise SpecError(f"{where}: gate thresholds must be >= 0")
    from .update import strategies  # a strategy's settings are its own: it checks them

    strategies.get(cfg.strategy, cfg.strategy_config)  # fails here, at spec time, on a bad strategy
    return cfg


@dataclass(frozen=True)
class RebaseConfig:
    """How an adapter child follows its parent's update."""

    steps_fraction: float = 0.2
    """Optimiser steps of the rebase as a share of the node's own training steps."""
    lr_scale: float = 1.0
    """Learning rate as a share of the node's own."""
    temperature: float = 1.0
    """Softening of the old child's and the student's distributions in the KL term."""
    alpha: float = 0.2
    """Weight of KL(old child || new child); ``1 - alpha`` goes to the hard-label loss. Measured on the update
    simulation: 0.2 keeps about 99% of a retrained child's gain at a fifth of the steps, 0.8 about 88%."""


def make_rebase(raw: dict | None, where: str) -> RebaseConfig:
    cfg = parse_dataclass(RebaseConfig, raw, where, "rebase")
    if not 0 < cfg.steps_fraction <= 1 or not 0 <= cfg.alpha <= 1 or cfg.lr_scale <= 0 or cfg.temperature <= 0:
        raise SpecError(f"{where}: rebase needs 0 < steps_fraction <= 1, 0 <= alpha <= 1, lr_scale > 0, "
                        "temperature > 0")
    return cfg
