"""Near-duplicate removal and near-duplicate leakage: MinHash (Broder 1997) with LSH banding (Leskovec et al.,
Mining of Massive Datasets, ch. 3.4), the method of datatrove's MinHash pipeline, done in numpy over whole shards.

Per shard (workers): shingles (word or character n-grams) -> MinHash signature -> one 64-bit hash per band.
Over the corpus (driver): documents sharing a band bucket are candidates; with ``verify`` a candidate pair is kept
only when the full signatures agree on at least ``threshold`` of their values (the estimated Jaccard similarity);
the pairs' connected components are the near-duplicate clusters. The evaluation documents of the tree
(``ctx.references``) are signed the same way and join the clusters, so a training document near one is leakage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..base import CorpusStep, Doc, Drop, StepStats, register
from ._shingles import (
    MinHasher,
    agreement,
    band_hashes,
    bucket_pairs,
    char_shingles,
    components,
    optimal_bands,
    read_references,
    word_shingles,
)

_B_BITS = 16
"""Bits kept of each MinHash value for verification (b-bit minwise hashing, Li & König 2010): two different
values agree by chance with probability 2**-16, corrected for in the estimate, at half the memory of 32 bits."""


@dataclass(frozen=True)
class NearDedupConfig:
    """MinHash LSH near-deduplication; the defaults are datatrove's (word 5-grams, 14 bands x 8 rows)."""

    shingle: Literal["word", "char"] = "word"
    """Shingles of words (lowercased, punctuation stripped) or of characters (lowercased, every run of
    punctuation and spaces as one space; use it for scripts written without spaces)."""
    ngram: int = 5
    """Words (or characters) per shingle."""
    num_perm: int = 112
    """MinHash permutations (signature length)."""
    bands: int | None = 14
    """LSH bands; with ``rows`` None too, both are chosen from ``threshold`` and ``num_perm`` to minimise the
    false positive plus false negative area under the S-curve (as datasketch does)."""
    rows: int | None = 8
    """Signature values per band (``bands * rows <= num_perm``). Two documents of Jaccard similarity s share a
    bucket with probability ``1 - (1 - s**rows)**bands``: 14 x 8 gives 50% at s = 0.72."""
    threshold: float = 0.7
    """Jaccard similarity of shingle sets from which two documents are near-duplicates."""
    verify: bool = True
    """Check each candidate pair on the full signature (estimated Jaccard >= threshold) before joining it; costs
    2 bytes per permutation per document in the driver, removes the bucket collisions of dissimilar documents."""
    seed: int = 1
    """Seed of the hash functions (fixed, so that decisions are reproducible)."""

    def check(self) -> None:
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError("ngram must be >= 1 and num_perm >= 2")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("threshold must be between 0 and 1")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither (then they are derived from threshold)")
        if self.bands is not None:
            if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
                raise ValueError(f"bands * rows must be <= num_perm ({self.bands} x {self.rows} > {self.num_perm})")
            # The S-curve's steepest point sits near (1/b)**(1/r): far from the threshold, the banding finds
            # mostly pairs below it (wasted work) or misses many above it.
            knee = (1.0 / self.bands) ** (1.0 / self.rows)
            if abs(knee - self.threshold) > 0.15:
                b, r = optimal_bands(self.threshold, self.num_perm)
                raise ValueError(f"{self.bands} bands x {self.rows} rows select pairs around Jaccard {knee:.2f}, "
                                 f"not threshold {self.threshold} (for it: bands {b}, rows {r}, or leave both unset)")

    def banding(self) -> tuple[int, int]:
        if self.bands is None:
            return optimal_bands(self.threshold, self.num_perm)
        return self.bands, self.rows


@register
class NearDedup(CorpusStep):
    """Keep one document per near-duplicate cluster (a test one when there is one: the others would leak it),
    and drop the training documents near any evaluation document of the tree."""

    name = "near_dedup"
    config_cls = NearDedupConfig

    def setup(self) -> None:
        self._hasher = MinHasher(self.config.num_perm, self.config.seed)
        self._banding = self.config.banding()

    def _sign(self, texts: list[str]) -> dict[str, np.ndarray]:
        if not hasattr(self, "_hasher"):
            self.setup()
        cfg = self.config
        if cfg.shingle == "word":
            h, doc = word_shingles(texts, cfg.ngram)
        else:
            h, doc = char_shingles(texts, cfg.ngram)
        sig = self._hasher(h, doc, len(texts))
        bands, rows = self._banding
        out = {"bands": band_hashes(sig, bands, rows, cfg.seed),
               "valid": np.bincount(doc, minlength=len(texts)) > 0}
        if cfg.verify:
            out["sig"] = (sig & np.uint32((1 << _B_BITS) - 1)).astype(np.uint16)
        return out

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        return self._sign([d.text for d in docs])

    def decide(self, ids, splits, signatures, stats: StepStats):
        cfg = self.config
        bands, valid, sigs = [], [], []
        for sig in signatures:
            bands.append(sig["bands"])
            valid.append(sig["valid"])
            if cfg.verify:
                sigs.append(sig["sig"])
        n_docs = sum(len(v) for v in valid)
        # The evaluation documents of the tree join the graph as extra nodes after the corpus's own.
        refs: list[str] = []
        for texts, where in read_references(self.ctx.references):
            sig = self._sign(texts)
            bands.append(sig["bands"])
            valid.append(sig["valid"])
            if cfg.verify:
                sigs.append(sig["sig"])
            refs.extend(f"{w}: {' '.join(t.split())[:60]}" for w, t in zip(where, texts))
        if not bands:
            return {}
        b_all = np.concatenate(bands)
        v_all = np.concatenate(valid)
        s_all = np.concatenate(sigs) if cfg.verify else None
        del bands, sigs
        u, v = bucket_pairs(b_all, v_all)
        stats.add("candidate_pairs", len(u))
        if cfg.verify and len(u):
            ok = _jaccard(s_all, u, v) >= cfg.threshold
            u, v = u[ok], v[ok]
        stats.add("similar_pairs", len(u))
        labels = components(len(b_all), u, v)
        return self._clusters(ids, splits, labels, n_docs, refs, b_all, s_all, stats)

    def _clusters(self, ids, splits, labels, n_docs, refs, b_all, s_all, stats) -> dict:
        size = np.bincount(labels, minlength=len(labels))
        members = np.flatnonzero(size[labels] > 1)
        if not len(members):
            return {}
        is_test = np.concatenate(splits) if splits else np.zeros(0, dtype=bool)
        docs = members[members < n_docs]
        ref_nodes = members[members >= n_docs]
        if not len(docs):
            return {}  # near-duplicates among the references only: not this corpus's business
        # The first reference of each cluster that has one (for leakage evidence).
        ref_of = np.full(len(labels), len(labels), dtype=np.int64)
        np.minimum.at(ref_of, labels[ref_nodes], ref_nodes)
        # The kept document of a cluster: its first test document, else its first document, in corpus order.
        order = docs[np.lexsort((docs, ~is_test[docs], labels[docs]))]
        head = np.concatenate([[True], labels[order[1:]] != labels[order[:-1]]])
        kept_of = np.full(len(labels), -1, dtype=np.int64)
        kept_of[labels[order[head]]] = order[head]
        stats.add("clusters", int(head.sum()))
        starts = np.cumsum([0] + [len(x) for x in ids])
        flat_ids = np.concatenate(ids)

        def where(i: int) -> tuple[int, int]:
            s = int(np.searchsorted(starts, i, side="right")) - 1
            return s, int(i - starts[s])

        out = {}
        for i in docs.tolist():
            lab = labels[i]
            kept, ref = int(kept_of[lab]), int(ref_of[lab])
            if not is_test[i] and ref < len(labels):
                out[where(i)] = Drop("leakage", evidence=f"{refs[ref - n_docs]}{self._similar(i, ref, b_all, s_all)}")
            elif i != kept:
                reason = "near_duplicate_of_test" if is_test[kept] and not is_test[i] else "near_duplicate"
                out[where(i)] = Drop(reason, evidence=f"{flat_ids[kept]}{self._similar(i, kept, b_all, s_all)}")
        return out

    def _similar(self, i: int, j: int, b_all: np.ndarray, s_all: np.ndarray | None) -> str:
        if s_all is not None:
            return f" (Jaccard ~ {_jaccard(s_all, np.array([i]), np.array([j]))[0]:.2f})"
        return f" ({int((b_all[i] == b_all[j]).sum())}/{b_all.shape[1]} bands shared)"


def _jaccard(sig: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity from b-bit signatures: agreement minus the chance agreement, rescaled."""
    chance = 2.0 ** -_B_BITS
    return np.clip((agreement(sig, u, v) - chance) / (1.0 - chance), 0.0, 1.0)
