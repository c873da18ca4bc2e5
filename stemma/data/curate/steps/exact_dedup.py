"""Exact deduplication: documents whose text is byte-identical after normalisation keep one copy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..base import CorpusStep, Doc, Drop, StepStats, register


@dataclass(frozen=True)
class ExactDedupConfig:
    """Exact deduplication has no settings: a copy is a copy."""


@register
class ExactDedup(CorpusStep):
    """Keep the first copy of each text; a copy in the test split wins over training copies (no leakage)."""

    name = "exact_dedup"
    config_cls = ExactDedupConfig

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        h = [int.from_bytes(hashlib.sha256(d.text.encode()).digest()[:8], "little") for d in docs]
        return {"hash": np.asarray(h, dtype=np.uint64)}

    def decide(self, ids, splits, signatures, stats: StepStats):
        hashes, where, test = [], [], []
        for i, sig in enumerate(signatures):
            n = len(sig["hash"])
            hashes.append(sig["hash"])
            where.append(np.stack([np.full(n, i, dtype=np.int64), np.arange(n, dtype=np.int64)], axis=1))
            test.append(splits[i])
        if not hashes:
            return {}
        h = np.concatenate(hashes)
        pos = np.concatenate(where)
        is_test = np.concatenate(test)
        # Sort by hash, test copies first, then corpus order: the first of each run is the one kept.
        order = np.lexsort((pos[:, 1], pos[:, 0], ~is_test, h))
        hs = h[order]
        first = np.ones(len(hs), dtype=bool)
        first[1:] = hs[1:] != hs[:-1]
        keep_of_run = order[np.maximum.accumulate(np.where(first, np.arange(len(hs)), 0))]
        out = {}
        for j in np.flatnonzero(~first):
            dup, kept = order[j], keep_of_run[j]
            s, r = int(pos[dup, 0]), int(pos[dup, 1])
            ks, kr = int(pos[kept, 0]), int(pos[kept, 1])
            out[(s, r)] = Drop("exact_duplicate", evidence=f"copy of {ids[ks][kr]}")
        return out
