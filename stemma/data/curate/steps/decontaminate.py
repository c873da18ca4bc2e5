"""Decontamination: training documents that share a word n-gram with evaluation data (GPT-3's 13-gram overlap,
Brown et al. 2020, appendix C: lowercase, punctuation stripped, n-grams found in more than 10 training documents
ignored as common phrases and boilerplate rather than leaked test content).

Evaluation data is both the tree's reference files (``ctx.references``: the test splits of every dataset, task
files) and this corpus's own ``test`` split, which is only known once every shard is read. So each shard's
signature carries the distinct n-gram hashes of its training documents (8 bytes per distinct n-gram) and the
n-grams and words of its test documents; ``decide`` gathers the evaluation n-grams (the references' and the test
split's, small) in a sorted uint64 array, spills the training hashes to a temporary folder as they stream by, and
matches them with ``searchsorted`` in a second pass: its memory stays one shard plus the evaluation data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..base import CorpusStep, Doc, Drop, StepStats, Tag, register
from ._shingles import Spill, member, ngrams, read_references, words


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

    def check(self) -> None:
        if self.n < 1 or self.min_overlap < 1 or self.max_train_docs < 1:
            raise ValueError("n, min_overlap and max_train_docs must be >= 1")


@register
class Decontaminate(CorpusStep):
    """Drop (or tag) training documents sharing an n-gram with a reference document or a test document."""

    name = "decontaminate"
    config_cls = DecontaminateConfig

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        n = self.config.n
        w = words([d.text for d in docs])
        h, first = ngrams(w.hashes, w.offsets, n, short=False)
        doc = np.searchsorted(w.offsets, first, side="right") - 1
        # Distinct n-grams per document, each at its first position.
        order = np.lexsort((first, h, doc))
        h, doc, first = h[order], doc[order], first[order]
        new = np.concatenate([[True], (h[1:] != h[:-1]) | (doc[1:] != doc[:-1])])[:len(h)]
        h, doc, first = h[new], doc[new], first[new]
        is_test = np.array([d.split == "test" for d in docs], dtype=bool)
        test = is_test[doc]
        test_rows = np.flatnonzero(is_test)
        # The test documents' words travel with the signature, to show a shared n-gram found in decide.
        test_text = [w.text(int(r), 0, int(w.offsets[r + 1] - w.offsets[r])).encode() for r in test_rows]
        return {
            "train_hash": h[~test], "train_doc": doc[~test].astype(np.int32),
            "test_hash": h[test], "test_doc": doc[test].astype(np.int32),
            "test_pos": (first[test] - w.offsets[doc[test]]).astype(np.int32),
            "test_rows": test_rows.astype(np.int32),
            "test_text": np.frombuffer(b"".join(test_text), dtype=np.uint8),
            "test_text_len": np.array([len(t) for t in test_text], dtype=np.int64),
        }

    def decide(self, ids, splits, signatures, stats: StepStats):
        cfg = self.config
        starts = np.cumsum([0] + [len(x) for x in ids])
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=str)
        # Evaluation n-grams: hash, and where it is from (reference number or test document, word position).
        ev_h, ev_src, ev_pos, n_refs = self._reference_ngrams()
        test_words: dict[int, list[str]] = {}
        with Spill() as spill:
            shards = 0
            for i, sig in enumerate(signatures):
                base = int(starts[i])
                spill.put(i, hash=sig["train_hash"], doc=sig["train_doc"])
                ev_h.append(sig["test_hash"])
                ev_src.append(n_refs + base + sig["test_doc"].astype(np.int64))
                ev_pos.append(sig["test_pos"].astype(np.int64))
                blob, cut = sig["test_text"].tobytes(), np.cumsum(np.concatenate([[0], sig["test_text_len"]]))
                for k, r in enumerate(sig["test_rows"].tolist()):
                    test_words[base + r] = blob[cut[k]:cut[k + 1]].decode().split(" ")
                shards += 1
            if not ev_h:
                return {}
            eh, first = np.unique(np.concatenate(ev_h), return_index=True)
            esrc, epos = np.concatenate(ev_src)[first], np.concatenate(ev_pos)[first]
            stats.add("evaluation_ngrams", len(eh))
            hit_h, hit_doc = [], []
            for i in range(shards if len(eh) else 0):
                h, d = spill.get(i, "hash"), spill.get(i, "doc")
                hit = member(h, eh)
                hit_h.append(np.asarray(h[hit]))
                hit_doc.append(np.asarray(d[hit]).astype(np.int64) + int(starts[i]))
        if not hit_h or not sum(len(x) for x in hit_h):
            return {}
        hh, hd = np.concatenate(hit_h), np.concatenate(hit_doc)
        # Training documents per shared n-gram: a common one is the corpus's own phrase, not a leak.
        uh, inv, df = np.unique(hh, return_inverse=True, return_counts=True)
        keep = df[inv] <= cfg.max_train_docs
        stats.add("common_ngrams_ignored", int((df > cfg.max_train_docs).sum()))
        hh, hd = hh[keep], hd[keep]
        # Per document, the shared n-gram that comes first in its evaluation document is shown.
        where = np.searchsorted(eh, hh)
        order = np.lexsort((epos[where], esrc[where], hd))
        hd, where = hd[order], where[order]
        docs, at, count = np.unique(hd, return_index=True, return_counts=True)
        chosen = count >= cfg.min_overlap
        docs, at, count = docs[chosen], at[chosen], count[chosen]
        texts = self._evidence(esrc[where[at]], epos[where[at]], n_refs, test_words, flat_ids)
        out = {}
        for g, c, ev in zip(docs.tolist(), count.tolist(), texts):
            s = int(np.searchsorted(starts, g, side="right")) - 1
            evidence = f"{c} shared {cfg.n}-gram(s), e.g. {ev}"
            if cfg.action == "drop":
                out[(s, g - int(starts[s]))] = Drop("contamination", evidence=evidence)
            else:
                out[(s, g - int(starts[s]))] = Tag({"contamination": {"ngrams": c, "evidence": ev}},
                                                   kind="contaminated", evidence=evidence)
        return out

    def _reference_ngrams(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
        """The references' n-gram hashes, the number of the reference each is from, its word position there, and
        how many references there are (test documents are numbered after them)."""
        hashes, sources, positions = [], [], []
        count = 0
        for texts, _ in read_references(self.ctx.references):
            w = words(texts)
            h, first = ngrams(w.hashes, w.offsets, self.config.n, short=False)
            doc = np.searchsorted(w.offsets, first, side="right") - 1
            hashes.append(h)
            sources.append(doc + count)
            positions.append(first - w.offsets[doc])
            count += len(texts)
        return hashes, sources, positions, count

    def _evidence(self, src: np.ndarray, pos: np.ndarray, n_refs: int, test_words: dict[int, list[str]],
                  flat_ids: np.ndarray) -> list[str]:
        """The shared n-gram as text, with where it is from (a reference file and line, or a test document)."""
        n = self.config.n
        out: list[str | None] = [None] * len(src)
        for k, (s, p) in enumerate(zip(src.tolist(), pos.tolist())):
            if s >= n_refs:
                gram = " ".join(test_words[s - n_refs][p:p + n])
                out[k] = f"{gram!r} (test document {flat_ids[s - n_refs]})"
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

