"""Compression build methods: each makes a *variant* version of its parent (same knowledge, smaller footprint).

- `quantized` (quantize.py): int8 per-channel or int4 group-wise weight-only quantisation.
- `lowrank` (lowrank.py): truncated SVD of the linear layers, at a rank or a kept energy.
- `pruned` (prune.py): unstructured magnitude pruning, or structured removal of heads / MLP neurons with an
  optional short recovery fine-tune.

Variants are stored standalone (the parent's adapter chain merged in), in the format of `layers.py`;
`Workspace.load_model` loads a version whose plan says ``variant`` with `layers.load_variant`.
"""

from __future__ import annotations

from typing import Any

from ..errors import SpecError
from ..train.registry import BuildMethod, Planned


class Compression(BuildMethod):
    """A method that makes a variant of its parent: no dataset, the parent's architecture, compressed storage."""

    needs_dataset = False

    def plan(self, cfg: Any, parent: Planned | None, spec: Any, node: Any) -> Planned:
        """The parent's config as a ``variant``; refused on a parent that is a variant itself (its layers are stored
        compressed: a second method would find no plain linear layer and compress nothing)."""
        if parent is not None and parent.kind == "variant":
            raise SpecError(f"node {node.path}: {node.parent} is a compressed variant with no plain weights to "
                            f"compress; make {node.path} a variant of {spec.nodes[node.parent].parent} instead")
        return Planned(parent.config if parent is not None else None, "variant")
