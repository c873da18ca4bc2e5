"""Decontamination: training documents that share a word n-gram with evaluation data (GPT-3's 13-gram overlap,
Brown et al. 2020, appendix C: lowercase, punctuation stripped, n-grams found in more than 10 training documents
ignored as common phrases and boilerplate rather than leaked test content).

Evaluation data is both the tree's reference files (``ctx.references``: the test splits of every dataset, task
files) and this corpus's own ``test`` split, which is only known once every shard is read. So each shard's
signature carries the distinct n-gram hashes of its training documents (8 bytes per distinct n-gram) and the
n-grams and words of its test documents. ``decide`` spills them to a temporary folder as they stream by (and the
references' n-grams, hashed once), counting the evaluation n-grams per range of hash values. The evaluation n-grams
grow with the test split (5% of a corpus of 2 GB is 18 million 13-grams, 48 bytes each while sorted), so the hash
ranges are grouped into as few passes as ``memory_mb`` allows (a partitioned hash join: an n-gram and all its
copies fall in the same range); each pass sorts its evaluation n-grams, matches the training n-grams of the same
range against them with ``searchsorted``, and reduces the matches to a count and a first match per contaminated
document at once. Memory: the largest shard's n-grams, one pass's evaluation n-grams, and 32 bytes per
contaminated document, whatever the size of the corpus or of its test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..base import CorpusStep, Doc, Drop, StepStats, Tag, register
from ._shingles import Spill, doc_chunks, group_ranges, ngrams, read_references, words

_EVAL_BYTES = 48
"""Memory per evaluation n-gram of a pass while it is sorted: hash, source, position, the sort order and copies."""
_TRAIN_BYTES = 32
"""Memory per training n-gram of the shard being matched: hash, document, the range test, the binary search."""
_RANGE_BITS = 16
"""Evaluation n-grams are counted per 65,536 ranges of hash values (their top bits), grouped into passes."""


@dataclass(frozen=True)
class DecontaminateConfig:
    """Which overlap with evaluation data counts as contamination, and what to do about it."""

    n: int = 13
    """Words per n-gram (13 as in GPT-3). Evaluation documents shorter than n words cannot match."""
    min_overlap: int = 1
    """Distinct shared n-grams from which a training document is contaminated (1 = any)."""
    max_train_docs: int = 10
    """An n-gram shared with evaluation data but found in more training documents than this is a common phrase or
    boilerplate (a licence, a footer), not leaked test content, and does not count (GPT-3 used 10)."""
    action: Literal["drop", "tag"] = "drop"
    """``drop`` the document, or keep it with ``meta["contamination"]`` recording the overlap."""
    memory_mb: int = 256
    """Memory ``decide`` may hold for the evaluation n-grams (the references' and the test split's) and the shard
    being matched: when they do not fit, the hash values are split into ranges matched in several passes over the
    spilled training n-grams, with the same result."""

    def check(self) -> None:
        if self.n < 1 or self.min_overlap < 1 or self.max_train_docs < 1:
            raise ValueError("n, min_overlap and max_train_docs must be >= 1")
        if self.memory_mb < 1:
            raise ValueError("memory_mb must be >= 1")


@register
class Decontaminate(CorpusStep):
    """Drop (or tag) training documents sharing an n-gram with a reference document or a test document."""

    name = "decontaminate"
    config_cls = DecontaminateConfig

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        # A million characters at a time: the 13-grams of a whole shard, sorted, would take 60 bytes a character.
        texts = [d.text for d in docs]
        is_test = np.array([d.split == "test" for d in docs], dtype=bool)
        parts = [self._sign(texts[lo:hi], is_test[lo:hi], lo) for lo, hi in doc_chunks(texts)]
        if not parts:
            parts = [self._sign([], is_test, 0)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _sign(self, texts: list[str], is_test: np.ndarray, base: int) -> dict[str, np.ndarray]:
        """The signature of consecutive documents, the first of which is document ``base`` of the shard."""
        w = words(texts)
        h, first = ngrams(w.hashes, w.offsets, self.config.n, short=False)
        doc = np.searchsorted(w.offsets, first, side="right") - 1
        # Distinct n-grams per document, each at its first position.
        order = np.lexsort((first, h, doc))
        h, doc, first = h[order], doc[order], first[order]
        new = np.concatenate([[True], (h[1:] != h[:-1]) | (doc[1:] != doc[:-1])])[:len(h)]
        h, doc, first = h[new], doc[new], first[new]
        test = is_test[doc]
        test_rows = np.flatnonzero(is_test)
        # The test documents' words travel with the signature, to show a shared n-gram found in decide.
        test_text = [w.text(int(r), 0, int(w.offsets[r + 1] - w.offsets[r])).encode() for r in test_rows]
        return {
            "train_hash": h[~test], "train_doc": (doc[~test] + base).astype(np.int32),
            "test_hash": h[test], "test_doc": (doc[test] + base).astype(np.int32),
            "test_pos": (first[test] - w.offsets[doc[test]]).astype(np.int32),
            "test_rows": (test_rows + base).astype(np.int32),
            "test_text": np.frombuffer(b"".join(test_text), dtype=np.uint8),
            "test_text_len": np.array([len(t) for t in test_text], dtype=np.int64),
        }

    def decide(self, ids, splits, signatures, stats: StepStats):
        cfg = self.config
        starts = np.cumsum([0] + [len(x) for x in ids])
        bins = 1 << _RANGE_BITS
        per_range = np.zeros(bins, dtype=np.int64)
        with Spill() as spill:
            # The references' n-grams, spilled in batches as "shards" -1, -2, ...: hash, reference number, position.
            n_refs, ref_batches = 0, 0
            for texts, _ in read_references(self.ctx.references):
                w = words(texts)
                h, first = ngrams(w.hashes, w.offsets, cfg.n, short=False)
                doc = np.searchsorted(w.offsets, first, side="right") - 1
                ref_batches += 1
                spill.put(-ref_batches, hash=h, src=doc + n_refs, pos=first - w.offsets[doc])
                per_range += np.bincount((h >> np.uint64(64 - _RANGE_BITS)).astype(np.int64), minlength=bins)
                n_refs += len(texts)
            shards, largest = 0, 0
            for i, sig in enumerate(signatures):
                spill.put(i, hash=sig["train_hash"], doc=sig["train_doc"], test_hash=sig["test_hash"],
                          test_doc=sig["test_doc"], test_pos=sig["test_pos"], test_rows=sig["test_rows"],
                          test_text=sig["test_text"], test_text_len=sig["test_text_len"])
                per_range += np.bincount((sig["test_hash"] >> np.uint64(64 - _RANGE_BITS)).astype(np.int64),
                                         minlength=bins)
                largest = max(largest, len(sig["train_hash"]))
                shards += 1
            if not per_range.any():
                stats.add("evaluation_ngrams", 0)
                return {}
            room = max((cfg.memory_mb << 20) - largest * _TRAIN_BYTES, 1 << 20) // _EVAL_BYTES
            passes = group_ranges(per_range, room)
            stats.add("passes", len(passes))
            # Per contaminated document: distinct shared n-grams, and the first one in evaluation order (the
            # source and position of its first evaluation occurrence), merged over the passes.
            found: dict[str, list[np.ndarray]] = {"doc": [], "count": [], "src": [], "pos": []}
            for lo, hi in passes:
                self._match(spill, ref_batches, shards, starts, n_refs, lo, hi, found, stats)
            test_text = self._test_text(spill, shards, starts, n_refs, found)
        if not found["doc"]:
            return {}
        doc, count, src, pos = (np.concatenate(found[k]) for k in ("doc", "count", "src", "pos"))
        # A document matched in several passes: counts add up, the earliest evidence wins.
        order = np.lexsort((pos, src, doc))
        doc, count, src, pos = doc[order], count[order], src[order], pos[order]
        head = np.concatenate([[True], doc[1:] != doc[:-1]])
        heads = np.flatnonzero(head)
        docs, total = doc[heads], np.add.reduceat(count, heads)
        src, pos = src[heads], pos[heads]
        chosen = total >= cfg.min_overlap
        docs, total, src, pos = docs[chosen], total[chosen], src[chosen], pos[chosen]
        texts = self._evidence(src, pos, n_refs, test_text, ids, starts)
        out = {}
        for g, c, ev in zip(docs.tolist(), total.tolist(), texts):
            s = int(np.searchsorted(starts, g, side="right")) - 1
            evidence = f"{c} shared {cfg.n}-gram(s), e.g. {ev}"
            if cfg.action == "drop":
                out[(s, g - int(starts[s]))] = Drop("contamination", evidence=evidence)
            else:
                out[(s, g - int(starts[s]))] = Tag({"contamination": {"ngrams": c, "evidence": ev}},
                                                   kind="contaminated", evidence=evidence)
        return out

    def _match(self, spill: Spill, ref_batches: int, shards: int, starts: np.ndarray, n_refs: int, lo: int,
               hi: int, found: dict[str, list[np.ndarray]], stats: StepStats) -> None:
        """One pass: the evaluation n-grams whose top hash bits are in ``[lo, hi)``, matched against the training
        n-grams in the same range; the matches reduced per document into ``found``."""
        cfg = self.config
        shift = np.uint64(64 - _RANGE_BITS)

        def in_range(h: np.ndarray) -> np.ndarray:
            top = h >> shift
            return (top >= np.uint64(lo)) & (top < np.uint64(hi))

        # References first, then the test documents in corpus order: the first of equal n-grams is the evidence.
        hs, srcs, poss = [], [], []
        for r in range(1, ref_batches + 1):
            h = spill.read(-r, "hash")
            at = in_range(h)
            hs.append(h[at])
            srcs.append(spill.read(-r, "src")[at])
            poss.append(spill.read(-r, "pos")[at])
        for i in range(shards):
            h = spill.read(i, "test_hash")
            at = in_range(h)
            hs.append(h[at])
            srcs.append(n_refs + int(starts[i]) + spill.read(i, "test_doc")[at].astype(np.int64))
            poss.append(spill.read(i, "test_pos")[at].astype(np.int64))
        eh, first = np.unique(np.concatenate(hs), return_index=True)
        del hs
        esrc, epos = np.concatenate(srcs)[first], np.concatenate(poss)[first]
        del srcs, poss, first
        stats.add("evaluation_ngrams", len(eh))
        if not len(eh):
            return
        hit_h, hit_doc = [], []
        for i in range(shards):
            h = spill.read(i, "hash")
            at = np.flatnonzero(in_range(h))
            h = h[at]
            where = np.minimum(np.searchsorted(eh, h), len(eh) - 1)
            hit = eh[where] == h
            hit_h.append(h[hit])
            hit_doc.append(spill.read(i, "doc")[at[hit]].astype(np.int64) + int(starts[i]))
        hh, hd = np.concatenate(hit_h), np.concatenate(hit_doc)
        if not len(hh):
            return
        # Training documents per shared n-gram (all of an n-gram's are in this pass): a common one is the corpus's
        # own phrase, not a leak.
        _, inv, df = np.unique(hh, return_inverse=True, return_counts=True)
        keep = df[inv] <= cfg.max_train_docs
        stats.add("common_ngrams_ignored", int((df > cfg.max_train_docs).sum()))
        hh, hd = hh[keep], hd[keep]
        where = np.searchsorted(eh, hh)
        src, pos = esrc[where], epos[where]
        order = np.lexsort((pos, src, hd))
        hd, src, pos = hd[order], src[order], pos[order]
        docs, at, count = np.unique(hd, return_index=True, return_counts=True)
        found["doc"].append(docs)
        found["count"].append(count)
        found["src"].append(src[at])
        found["pos"].append(pos[at])

    def _test_text(self, spill: Spill, shards: int, starts: np.ndarray, n_refs: int,
                   found: dict[str, list[np.ndarray]]) -> dict[int, list[str]]:
        """The words of the test documents that some evidence may quote (read back from the spilled shards)."""
        wanted = np.unique(np.concatenate(found["src"])) if found["src"] else np.zeros(0, dtype=np.int64)
        wanted = wanted[wanted >= n_refs] - n_refs
        out: dict[int, list[str]] = {}
        for i in range(shards):
            mine = wanted[(wanted >= starts[i]) & (wanted < starts[i + 1])] - int(starts[i])
            if not len(mine):
                continue
            rows = spill.read(i, "test_rows")
            cut = np.concatenate([[0], np.cumsum(spill.read(i, "test_text_len"))])
            blob = spill.read(i, "test_text")
            for r in mine.tolist():
                k = int(np.searchsorted(rows, r))
                out[int(starts[i]) + r] = blob[cut[k]:cut[k + 1]].tobytes().decode().split(" ")
        return out

    def _evidence(self, src: np.ndarray, pos: np.ndarray, n_refs: int, test_words: dict[int, list[str]],
                  ids: list[np.ndarray], starts: np.ndarray) -> list[str]:
        """The shared n-gram as text, with where it is from (a reference file and line, or a test document)."""
        n = self.config.n
        out: list[str | None] = [None] * len(src)
        for k, (s, p) in enumerate(zip(src.tolist(), pos.tolist())):
            if s >= n_refs:
                gram = " ".join(test_words[s - n_refs][p:p + n])
                shard = int(np.searchsorted(starts, s - n_refs, side="right")) - 1
                out[k] = f"{gram!r} (test document {ids[shard][s - n_refs - int(starts[shard])]})"
        wanted = {s: [] for s in src.tolist() if s < n_refs}
        for k, s in enumerate(src.tolist()):
            if s < n_refs:
                wanted[s].append(k)
        if wanted:
            # One more read of the reference files, for the few documents whose n-grams are shown.
            base = 0
            for texts, where in read_references(self.ctx.references):
                mine = [r for r in range(len(texts)) if base + r in wanted]
                if mine:
                    w = words([texts[r] for r in mine])
                    for j, r in enumerate(mine):
                        for k in wanted[base + r]:
                            out[k] = f"{w.text(j, int(pos[k]), n)!r} ({where[r]})"
                base += len(texts)
        return [o or "?" for o in out]
