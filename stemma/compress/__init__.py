"""Compression build methods: each makes a *variant* version of its parent (same knowledge, smaller footprint).

- `quantized` (quantize.py): int8 per-channel or int4 group-wise weight-only quantisation.
- `lowrank` (lowrank.py): truncated SVD of the linear layers, at a rank or a kept energy.
- `pruned` (prune.py): unstructured magnitude pruning, or structured removal of heads / MLP neurons with an
  optional short recovery fine-tune.

Variants are stored standalone (the parent's adapter chain merged in), in the format of `layers.py`, and
`Workspace.load_model` loads them through the loader registered here for their relation.
"""

from ..models.io import register_loader
from .layers import load_variant


def _load(files, manifest):
    """Variant files load through `load_variant`; a version stored as a plain model falls through."""
    return load_variant(files) if "variant.json" in files else None


for _relation in ("quantized", "lowrank", "pruned"):
    register_loader(_relation, _load)
