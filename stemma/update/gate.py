"""The gate: when a node accepts an aggregate of its contributors' updates.

The criteria are explicit and measured, per node, in stemma.yaml (``gate:``):
1. at least ``min_contributors`` distinct contributors sent updates against the same version;
2. the candidate (parent + ``server_lr`` x aggregate) lowers perplexity on the contributors' held-out data by at
   least ``min_heldout_gain`` (it helps the people who sent it);
3. it raises the node's perplexity on its own test split by at most ``max_own_rise`` (the parent does not forget);
4. it raises the node's perplexity on each child's test split by at most ``max_child_rise`` (the children's
   footing does not move under them).
A rejected candidate is kept with its reasons; an accepted one becomes the node's new version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..configs import GateConfig


@dataclass
class Verdict:
    accepted: bool
    reasons: list[str]
    metrics: dict[str, Any]


def judge(cfg: GateConfig, n_contributors: int, heldout: tuple[float, float] | None, own: tuple[float, float] | None,
          children: dict[str, tuple[float, float]]) -> Verdict:
    """Apply the criteria to measured perplexities, each given as (before, after)."""
    reasons: list[str] = []
    ok = True
    metrics: dict[str, Any] = {"contributors": n_contributors}
    if n_contributors < cfg.min_contributors:
        ok = False
        reasons.append(f"{n_contributors} contributor(s), the gate needs {cfg.min_contributors}")
    if heldout is None:
        ok = False
        reasons.append("no held-out data came with the updates: the gain cannot be checked")
    else:
        b, a = heldout
        gain = 1 - a / b
        metrics["heldout_ppl"] = {"before": b, "after": a, "gain": gain}
        if gain < cfg.min_heldout_gain or a >= b:
            ok = False
            reasons.append(f"contributors' held-out perplexity {b:.2f} -> {a:.2f} ({-gain:+.1%}); "
                           f"the gate needs a drop of at least {cfg.min_heldout_gain:.1%}")
        else:
            reasons.append(f"contributors' held-out perplexity {b:.2f} -> {a:.2f} ({-gain:+.1%})")
    if own is not None:
        b, a = own
        rise = a / b - 1
        metrics["own_ppl"] = {"before": b, "after": a, "rise": rise}
        if rise > cfg.max_own_rise:
            ok = False
            reasons.append(f"own test perplexity {b:.2f} -> {a:.2f} ({rise:+.1%}), above the {cfg.max_own_rise:.1%} "
                           "allowed: the node would forget")
        else:
            reasons.append(f"own test perplexity {b:.2f} -> {a:.2f} ({rise:+.1%})")
    metrics["children_ppl"] = {}
    for child, (b, a) in sorted(children.items()):
        rise = a / b - 1
        metrics["children_ppl"][child] = {"before": b, "after": a, "rise": rise}
        if rise > cfg.max_child_rise:
            ok = False
            reasons.append(f"perplexity on {child}'s test split {b:.2f} -> {a:.2f} ({rise:+.1%}), above the "
                           f"{cfg.max_child_rise:.1%} allowed")
    if ok:
        reasons.insert(0, "accepted")
    return Verdict(ok, reasons, metrics)
