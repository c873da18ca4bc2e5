"""Model families: everything architecture-specific, one module per family behind one interface.

A family knows how to make the Hugging Face config for a stemma config, which projections LoRA adapts, how a
student starts from its teacher, what structured pruning removes, what the serving decoder needs from the
weights and how llama.cpp names the tensors. The rest of stemma asks `of(config)` (or `get(name)`) and never
looks at ``model_type`` itself. Adding a family is one module here that calls `register`, plus its parity tests.
"""

from __future__ import annotations

from ...errors import StemmaError
from ...plugins import Registry
from .base import ArchConfig, Family, UnsupportedArchitectureError

_FAMILIES: Registry[Family] = Registry("model family", lambda family: family.name, StemmaError)
_BY_MODEL_TYPE: dict[str, Family] = {}
names, get = _FAMILIES.names, _FAMILIES.get


def register(family: Family) -> Family:
    """Make ``family`` available under its name and for each of its Hugging Face ``model_type`` values."""
    _FAMILIES.register(family)
    for mt in family.model_types:
        _BY_MODEL_TYPE[mt] = family
    return family


def find(config) -> Family | None:
    """The family of a transformers config (or a model), or None when stemma has none for its model type."""
    return _BY_MODEL_TYPE.get(getattr(getattr(config, "config", config), "model_type", None))


def of(config) -> Family:
    """The family of a transformers config (or a model), refusing model types stemma has no family for."""
    fam = find(config)
    if fam is None:
        mt = getattr(getattr(config, "config", config), "model_type", None)
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnsupportedArchitectureError(f"model_type {mt!r} has no stemma model family (supported: {known})")
    return fam


def checked(config) -> Family:
    """`of(config)` after the family has refused every setting it does not implement."""
    fam = of(config)
    fam.check(getattr(config, "config", config))
    return fam


from . import gpt2, llama  # noqa: E402,F401 - each module registers its family

__all__ = ["ArchConfig", "Family", "UnsupportedArchitectureError", "checked", "find", "get", "names", "of", "register"]
