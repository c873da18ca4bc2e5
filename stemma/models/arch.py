"""Facts about a loaded model that do not depend on its family (the family-specific ones: `models.families`)."""

from __future__ import annotations


def count_params(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def model_context(model) -> int:
    """Longest sequence the model takes (its family's answer; a generic reading for other causal LMs)."""
    from .families import find

    c = getattr(model, "config", model)
    fam = find(c)
    if fam is not None:
        return fam.context(c)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048
