"""Compression build methods: each makes a *variant* version of its parent (same knowledge, smaller footprint).

- `quantized` (quantize.py): int8 per-channel or int4 group-wise weight-only quantisation.
- `lowrank` (lowrank.py): truncated SVD of the linear layers, at a rank or a kept energy.
- `pruned` (prune.py): unstructured magnitude pruning, or structured removal of heads / MLP neurons with an
  optional short recovery fine-tune.

Variants are stored standalone (the parent's adapter chain merged in), in the format of `layers.py`;
`Workspace.load_model` loads a version whose plan says ``variant`` with `layers.load_variant`.
"""
