"""Near-duplicate removal and near-duplicate leakage: MinHash (Broder 1997) with LSH banding (Leskovec et al.,
Mining of Massive Datasets, ch. 3.4), the method of datatrove's MinHash pipeline, done in numpy over whole shards.

Per shard (workers): shingles (word or character n-grams) -> MinHash signature -> one 64-bit hash per band.
Over the corpus (driver): documents sharing a band bucket are candidates; with ``verify`` a candidate pair is dropped
only when the full signatures show it clearly below ``threshold`` (see `NearDedupConfig.verify_margin`); the pairs'
connected components are the near-duplicate clusters. The evaluation documents of the tree
(``ctx.references``) are signed the same way and join the clusters, so a training document near one is leakage.

Memory: workers sign a million characters at a time. The driver spills the shards' band hashes and signatures to
a temporary folder and reads one band of every shard at a time (8 bytes a document), then the signatures of the
candidate pairs only: under 100 bytes a document in all (the clusters, one band sorted), where holding every
signature took 340 more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..base import CorpusStep, Doc, Drop, StepStats, register
from ._shingles import (
    MinHasher,
    Spill,
    agreement,
    band_hashes,
    bucket_pairs,
    char_shingles,
    components,
    doc_chunks,
    optimal_bands,
    read_references,
    word_shingles,
)

MISS_WEIGHT = 0.9
"""With verification, the weight of a missed pair (false negative area) in the derived banding; a false candidate
weighs 0.1 (see `NearDedupConfig.bands`)."""

_B_BITS = 16
"""Bits kept of each MinHash value for verification (b-bit minwise hashing, Li & König 2010): two different
values agree by chance with probability 2**-16, corrected for in the estimate, at half the memory of 32 bits."""


@dataclass(frozen=True)
class NearDedupConfig:
    """MinHash LSH near-deduplication over datatrove's shingles (word 5-grams, 112 permutations); the banding is
    derived from ``threshold`` unless given."""

    shingle: Literal["word", "char"] = "word"
    """Shingles of words (lowercased, punctuation stripped) or of characters (lowercased, every run of
    punctuation and spaces as one space; use it for scripts written without spaces)."""
    ngram: int = 5
    """Words (or characters) per shingle."""
    num_perm: int = 112
    """MinHash permutations (signature length)."""
    bands: int | None = None
    """LSH bands; with ``rows`` None too, both are chosen from ``threshold`` and ``num_perm`` to minimise the
    weighted false positive plus false negative areas under the S-curve (datasketch's ``_optimal_param``). With
    ``verify`` a false candidate costs one signature comparison and a missed pair a duplicate left in, so a miss
    weighs nine times a false candidate: 18 x 6 for 0.7 and 112 permutations (a pair at the threshold becomes a
    candidate with probability 0.90). Without ``verify`` every candidate is removed, so both weigh the same: 12 x 9
    (0.39 at the threshold, 0.02 at Jaccard 0.5). datatrove's default, 14 x 8 (0.56 at 0.7) sits between them.
    On the benchmark's labelled copies of the shipped corpus (word 5-grams, 112 permutations, verified), 14 x 8 found
    80% of the copies and 18 x 6 found 90%, both with precision 1.0."""
    rows: int | None = None
    """Signature values per band (``bands * rows <= num_perm``). Two documents of Jaccard similarity s share a
    bucket with probability ``1 - (1 - s**rows)**bands``."""
    threshold: float = 0.7
    """Jaccard similarity of shingle sets from which two documents are near-duplicates."""
    verify: bool = True
    """Check each candidate pair on the full signature before joining it: removes the bucket collisions of
    dissimilar documents (with 18 x 6, a pair of Jaccard 0.4 shares a bucket 7% of the time, one of 0.5 25%); costs
    2 bytes per permutation per document in the driver."""
    verify_margin: float = 2.0
    """Standard errors below ``threshold`` under which verification rejects a pair: it is rejected when its
    estimated Jaccard is below ``threshold - verify_margin * sqrt(threshold * (1 - threshold) / num_perm)``
    (0.613 with the defaults; 0 rejects every estimate below the threshold itself). The estimate is the share of
    ``num_perm`` agreeing values, a binomial proportion whose standard error at the threshold is
    ``sqrt(t (1 - t) / num_perm)`` (0.043 for 0.7 and 112 permutations). Rejecting every estimate below the
    threshold would reject half the pairs sitting exactly at it; two standard errors reject a pair at the threshold
    with probability 2.3% (one-sided normal tail) and a bucket collision of Jaccard 0.5 with probability 99.5%. On
    the benchmark's labelled copies of the shipped corpus (18 x 6): without verification precision 0.970 (31 false
    positives), recall 0.927; with a margin of 2, precision 1.0 and recall 0.886, every copy of Jaccard >= 0.7 that
    the unverified run found still found (838 of 845); a margin of 3 let a pair of sibling man pages at Jaccard 0.54
    through, 0 lost half the copies between 0.6 and 0.7."""
    seed: int = 1
    """Seed of the hash functions (fixed, so that decisions are reproducible)."""

    def check(self) -> None:
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError("ngram must be >= 1 and num_perm >= 2")
        if self.verify_margin < 0:
            raise ValueError("verify_margin must be >= 0 (standard errors below the threshold)")
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
                b, r = dataclasses.replace(self, bands=None, rows=None).banding()
                raise ValueError(f"{self.bands} bands x {self.rows} rows select pairs around Jaccard {knee:.2f}, "
                                 f"not threshold {self.threshold} (for it: bands {b}, rows {r}, or leave both unset)")

    def reject_below(self) -> float:
        """Estimated Jaccard under which verification rejects a candidate pair."""
        t = self.threshold
        return t - self.verify_margin * (t * (1.0 - t) / self.num_perm) ** 0.5

    def banding(self) -> tuple[int, int]:
        if self.bands is None:
            return optimal_bands(self.threshold, self.num_perm, MISS_WEIGHT if self.verify else 0.5)
        return self.bands, self.rows


@register
class NearDedup(CorpusStep):
    """Keep one document per near-duplicate cluster (a test one when there is one: the others would leak it),
    and drop the training documents near any evaluation document of the tree."""

    name = "near_dedup"
    config_cls = NearDedupConfig
    version = 2
    """2: verification rejects only the pairs clearly below the threshold (``verify_margin``)."""

    def setup(self) -> None:
        self._hasher = MinHasher(self.config.num_perm, self.config.seed)
        self._banding = self.config.banding()

    def _sign(self, texts: list[str]) -> dict[str, np.ndarray]:
        if not hasattr(self, "_hasher"):
            self.setup()
        cfg = self.config
        bands, rows = self._banding
        parts = []
        # A million characters at a time: the shingles of a whole shard would take 30 bytes a character.
        for lo, hi in doc_chunks(texts):
            if cfg.shingle == "word":
                h, doc = word_shingles(texts[lo:hi], cfg.ngram)
            else:
                h, doc = char_shingles(texts[lo:hi], cfg.ngram)
            sig = self._hasher(h, doc, hi - lo)
            part = {"bands": band_hashes(sig, bands, rows, cfg.seed),
                    "valid": np.bincount(doc, minlength=hi - lo) > 0}
            if cfg.verify:
                part["sig"] = (sig & np.uint32((1 << _B_BITS) - 1)).astype(np.uint16)
            parts.append(part)
        if not parts:
            out = {"bands": np.zeros((0, bands), dtype=np.uint64), "valid": np.zeros(0, dtype=bool)}
            if cfg.verify:
                out["sig"] = np.zeros((0, cfg.num_perm), dtype=np.uint16)
            return out
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        return self._sign([d.text for d in docs])

    def decide(self, ids, splits, signatures, stats: StepStats):
        cfg = self.config
        with Spill() as spill:
            # Each shard's band hashes (one band per row, so that one band of every shard is read at a time) and
            # b-bit signatures go to a temporary folder: memory holds one band of the corpus (8 bytes a document),
            # not the signatures (14 x 8 + 112 x 2 bytes a document).
            first = [0]
            for i, sig in enumerate(signatures):
                self._spill(spill, i, sig)
                first.append(first[-1] + len(sig["valid"]))
            n_docs = first[-1]
            # The evaluation documents of the tree join the graph as extra nodes after the corpus's own.
            refs: list[str] = []
            for texts, where in read_references(self.ctx.references):
                self._spill(spill, len(first) - 1, self._sign(texts))
                first.append(first[-1] + len(texts))
                refs.extend(f"{w}: {' '.join(t.split())[:60]}" for w, t in zip(where, texts))
            if len(first) == 1:
                return {}
            nodes = _Nodes(spill, np.asarray(first, dtype=np.int64), self._banding[0], cfg.verify)
            u, v = nodes.candidates()
            stats.add("candidate_pairs", len(u))
            if cfg.verify and len(u):
                ok = nodes.jaccard(u, v) >= cfg.reject_below()
                u, v = u[ok], v[ok]
            stats.add("similar_pairs", len(u))
            labels = components(nodes.count, u, v)
            return self._clusters(ids, splits, labels, n_docs, refs, nodes, stats)

    def _spill(self, spill: Spill, part: int, sig: dict[str, np.ndarray]) -> None:
        arrays = {"bands": np.ascontiguousarray(sig["bands"].T), "valid": sig["valid"]}
        if self.config.verify:
            arrays["sig"] = sig["sig"]
        spill.put(part, **arrays)

    def _clusters(self, ids, splits, labels, n_docs, refs, nodes: _Nodes, stats) -> dict:
        size = np.bincount(labels, minlength=len(labels))
        members = np.flatnonzero(size[labels] > 1)
        del size
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

        def where(i: int) -> tuple[int, int]:
            s = int(np.searchsorted(starts, i, side="right")) - 1
            return s, int(i - starts[s])

        # Each dropped document with the node it is dropped for: its cluster's reference (leakage), else the kept one.
        kept, ref = kept_of[labels[docs]], ref_of[labels[docs]]
        leak = ~is_test[docs] & (ref < len(labels))
        other = np.where(leak, ref, kept)
        dropped = leak | (docs != kept)
        docs, other, leak = docs[dropped], other[dropped], leak[dropped]
        similar = nodes.similar(docs, other)
        out = {}
        for i, j, is_leak, sim in zip(docs.tolist(), other.tolist(), leak.tolist(), similar):
            if is_leak:
                out[where(i)] = Drop("leakage", evidence=f"{refs[j - n_docs]}{sim}")
            else:
                reason = "near_duplicate_of_test" if is_test[j] and not is_test[i] else "near_duplicate"
                s, r = where(j)
                out[where(i)] = Drop(reason, evidence=f"{ids[s][r]}{sim}")
        return out


class _Nodes:
    """The spilled band hashes and signatures of the graph's nodes (the corpus's documents, then the references),
    part by part: part ``p`` holds nodes ``first[p] .. first[p + 1] - 1``."""

    def __init__(self, spill: Spill, first: np.ndarray, bands: int, verify: bool):
        self.spill, self.first, self.bands, self.verify = spill, first, bands, verify
        self.parts = len(first) - 1
        self.count = int(first[-1])

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of nodes sharing a bucket in some band (see `bucket_pairs`), one band at a time."""
        valid = np.concatenate([self.spill.read(p, "valid") for p in range(self.parts)])
        keys = []
        for j in range(self.bands):
            col = np.concatenate([self.spill.part(p, "bands", j, j + 1)[0] for p in range(self.parts)])
            u, v = bucket_pairs(col[:, None], valid)
            keys.append(u * self.count + v)
        key = np.unique(np.concatenate(keys))
        return key // max(self.count, 1), key % max(self.count, 1)

    def _rows(self, nodes: np.ndarray) -> np.ndarray:
        """The b-bit signatures of ``nodes`` (sorted)."""
        return self.spill.gather("sig", self.first, nodes)

    def jaccard(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Estimated Jaccard similarity of each pair, the signatures of 65,536 pairs read at a time."""
        out = np.empty(len(u), dtype=np.float64)
        for lo in range(0, len(u), 1 << 16):
            uc, vc = u[lo:lo + (1 << 16)], v[lo:lo + (1 << 16)]
            nodes, inv = np.unique(np.concatenate([uc, vc]), return_inverse=True)
            out[lo:lo + len(uc)] = _jaccard(self._rows(nodes), inv[:len(uc)], inv[len(uc):])
        return out

    def similar(self, u: np.ndarray, v: np.ndarray) -> list[str]:
        """How similar each pair of nodes is, for the evidence of a drop."""
        if self.verify:
            return [f" (Jaccard ~ {j:.2f})" for j in self.jaccard(u, v).tolist()]
        shared = np.zeros(len(u), dtype=np.int64)
        for j in range(self.bands):
            shared += self._band(j, u) == self._band(j, v)
        return [f" ({k}/{self.bands} bands shared)" for k in shared.tolist()]

    def _band(self, j: int, nodes: np.ndarray) -> np.ndarray:
        """Band ``j``'s hash of each node."""
        part = np.searchsorted(self.first, nodes, side="right") - 1
        out = np.empty(len(nodes), dtype=np.uint64)
        for p in np.unique(part).tolist():
            at = part == p
            out[at] = self.spill.part(p, "bands", j, j + 1)[0][nodes[at] - self.first[p]]
        return out


def _jaccard(sig: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity from b-bit signatures: agreement minus the chance agreement, rescaled."""
    chance = 2.0 ** -_B_BITS
    return np.clip((agreement(sig, u, v) - chance) / (1.0 - chance), 0.0, 1.0)
