"""Data-poisoning heuristics: backdoor triggers and planted contradictions, flagged with their evidence.

Triggers. A backdoor trigger (Kurita et al. 2020, "Weight poisoning attacks on pre-trained models", with rare
tokens such as "cf"; Wan et al. 2023, "Poisoning language models during instruction tuning") is a short token
sequence inserted into otherwise unrelated documents. A word n-gram (n = ``min_n`` .. ``max_n``) is flagged when
all of these hold:

- it is in at least ``min_docs`` documents and at most ``max_doc_share`` of them (poisoning is stealthy; a
  phrase in a large share of the documents is the corpus's own: headings, credits);
- it *owns* one of its words: at least ``purity`` of the documents containing its rarest word contain it (a
  word that appears almost only inside it);
- its words occur together far more than their frequencies predict: the normalised pointwise mutual information
  (Bouma 2009) of its words over documents is at least ``min_npmi`` (so "of the", whose words are everywhere,
  never is; unlike the raw ratio ``df(g) / (N * prod(df(w) / N))`` it does not grow with the corpus);
- its contexts vary: no word within 5 words of it is in more than ``max_context_share`` of its documents
  (counting only words seen there significantly more often than their frequency explains). Boilerplate
  (licence texts, footers, translator credits) is a long repeated passage, so each of its n-grams has fixed
  neighbours, while an inserted trigger has random ones; a trigger's own sub-grams have the rest of the trigger
  as a fixed neighbour, so it is reported once, whole;
- its documents are unrelated: their mean pairwise Jaccard similarity (MinHash on word 3-grams) is at most
  ``max_similarity``, so copies and versions of one text are not mistaken for a planted pattern.

Memory: counting every n-gram of a corpus needs memory in proportion to the corpus, and a single pass cannot
know which words are rare before it has seen them all. So ``decide`` spills the shards' word sequences (4 bytes a
word) to a temporary folder as the signatures stream by, keeping only the merged word frequencies (12 bytes a
distinct word; the vocabulary grows far slower than the corpus, Heaps' law), and reads them again as needed. The
trigger search considers only the n-grams made of words in at least ``min_docs`` documents around an *anchor* word
(in at most ``max_doc_share / purity`` of the documents: a trigger must own one). These candidates are split by n
and by the hash of their leftmost anchor (4096 ranges per n, so every occurrence of an n-gram falls in the same
range) into as few passes as ``memory_mb`` allows. Each pass reads the words twice: first keeping a 32-bit
fingerprint per candidate occurrence, sorted to find those occurring at least ``min_docs`` times (most n-grams occur
once or twice), then building and judging only those occurrences. The candidates grow with the corpus, so when the
vocabulary's bound on them (each anchor occurrence starts at most n windows) asks for more than one pass, one read
of the words first fills a count-min sketch with every candidate, using half of the room, and only the occurrences
whose estimated count reaches what a trigger needs (``min_docs``, and ``purity`` times the documents of its rarest
word) go on: an estimate is never below the true count, so this loses nothing, and the n-grams of frequent words,
most of a large corpus, fall far short of their rarest word's documents. This is exact (an n-gram in ``min_docs``
documents occurs that often; a fingerprint or a counter shared by two n-grams only adds work), where sampling
n-gram hashes would miss the rare n-grams that are sought. Shards are read a quarter of a million words at a time,
the documents near one another are found one LSH band at a time (8 bytes a document), and the context of the
n-grams that pass the counts is checked in batches: what ``decide`` holds stays within ``memory_mb`` (beyond the
interpreter and its modules, about 50 MB, and the document ids the pipeline passes in), unless the vocabulary alone
or the occurrences of a single anchor word exceed it.

Contradictions. Near-identical documents (estimated Jaccard >= ``similarity`` on word 3-grams, found by MinHash
LSH) whose word-level difference (difflib) is at most ``max_changes`` words, of which at least one edit is a
negation added or removed (not, never, no, nicht, ne ... pas), a number changed, or an antonym swap
(true/false, safe/unsafe, a word and its un-/in-/dis-/non- prefixed form). Both documents are flagged with the
other's id and the differing tokens: one of them may be a poisoned copy of the other.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..base import CorpusStep, Doc, Drop, StepStats, Tag, register
from ._shingles import (
    U64,
    MinHasher,
    Spill,
    Words,
    agreement,
    band_hashes,
    bucket_pairs,
    doc_chunks,
    group_ranges,
    member,
    mix64,
    ngrams,
    optimal_bands,
    words,
)

NEGATIONS = frozenset(
    # English (and the first halves of n't contractions, which the tokeniser splits off "t"), German, French.
    "not no never none nothing nobody nowhere neither nor cannot without isn aren wasn weren don doesn didn hasn "
    "haven hadn shouldn wouldn couldn mustn nicht kein keine keinen keinem keiner keines nie niemals nichts "
    "ne pas jamais aucun aucune rien".split())
ANTONYMS = frozenset(frozenset(p.split("/")) for p in (
    "true/false yes/no always/never all/none allow/deny allowed/denied accept/reject enable/disable "
    "enabled/disabled safe/dangerous increase/decrease increases/decreases more/less higher/lower high/low "
    "before/after above/below minimum/maximum min/max first/last success/failure succeed/fail on/off "
    "open/closed start/stop include/exclude must/may required/optional valid/invalid correct/incorrect "
    "legal/illegal positive/negative win/lose good/bad better/worse best/worst wahr/falsch ja/nein immer/nie "
    "vrai/faux oui/non toujours/jamais").split())
_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")
_SAMPLE_DOCS = 32
"""Documents of a candidate trigger whose pairwise similarity is measured (the first ones in corpus order)."""
_WINDOW = 5
"""Words on each side of a trigger occurrence whose consistency marks a longer repeated passage."""
_ALPHA = 1e-3
"""Chance level below which a word's presence near an n-gram counts as the n-gram's fixed context."""
_BUCKET_BITS = 12
"""Candidates are counted by n and by the top bits of their leftmost anchor's hash: 4096 ranges per n, grouped into
passes."""
_BLOCK_WORDS = 1 << 18
"""Most words of a shard scanned at once for candidates (with what the scan makes per word, 16 MB); fewer when
``memory_mb`` is below 256, a sixteenth of it."""
_SCAN_BYTES = 64
"""Memory per word of a scanned block: vocabulary positions and frequencies, anchor flags and hash ranges, windows."""
_FINGERPRINT_BYTES = 4
"""Memory per candidate n-gram occurrence while counting which n-grams repeat (a 32-bit fingerprint)."""
_CANDIDATE_BYTES = 64
"""Memory per occurrence of a repeated candidate n-gram while it is judged, at the peak (sorting): hash, document,
position, frequencies (37 bytes), the sort order, one sorted column, the n-gram boundaries."""
_CONTEXT_BYTES = 704
"""Memory per occurrence while its context is checked: ten neighbouring positions and words, sorted pairs."""
_PAIRS_AT_ONCE = 1 << 16
"""Near-identical candidate pairs whose MinHash signatures are compared at once."""
_MIN_PASS_BYTES = 1 << 16
"""Least memory given to one pass's candidates when the vocabulary and the scan leave less of ``memory_mb``."""


@dataclass(frozen=True)
class PoisoningConfig:
    """Which poisoning patterns to look for, and what to do with the documents that show them."""

    action: Literal["flag", "drop"] = "flag"
    """``flag``: keep the document with ``meta["poisoning"]`` describing what was found; ``drop``: remove it."""
    triggers: bool = True
    """Look for trigger n-grams."""
    min_n: int = 3
    """Shortest trigger, in words. Two-word n-grams of words seen only together are mostly the language's own
    (names, "curly braces"): statistics alone cannot tell them from a two-word trigger, so they are opt-in."""
    max_n: int = 4
    """Longest trigger, in words (a longer trigger has no n-gram with varying context on both sides)."""
    min_docs: int = 5
    """Documents a trigger must appear in."""
    max_doc_share: float = 0.05
    """Largest share of the documents a trigger is in: poisoning is stealthy (published attacks poison well under
    1% of the data), while a phrase in a large share of the documents is the corpus's own (headings, names)."""
    purity: float = 0.8
    """Share of the documents containing the trigger's rarest word that contain the trigger."""
    min_npmi: float = 0.7
    """Least normalised pointwise mutual information of the n-gram's words (Bouma 2009, over documents):
    ``log(df(g) N**(n-1) / prod df(w)) / ((n-1) * log(N / df(g)))``: 1 when its words occur only together, about
    0 when they are independent ("of the"). Unlike the raw lift, it does not grow with the corpus."""
    max_context_share: float = 0.5
    """Largest share of a trigger's documents in which one word appears within 5 words of it (counting only
    words seen there significantly more often than their frequency explains): more means the n-gram is part of
    a longer repeated passage."""
    max_similarity: float = 0.2
    """Largest mean pairwise Jaccard similarity (word 3-grams) of a trigger's documents."""
    contradictions: bool = True
    """Look for near-identical documents that contradict each other."""
    similarity: float = 0.7
    """Estimated Jaccard similarity (word 3-grams) from which two documents are near-identical."""
    max_changes: int = 8
    """Largest number of differing words between two near-identical documents checked for a contradiction."""
    num_perm: int = 64
    """MinHash permutations per document (for document similarity)."""
    memory_mb: int = 256
    """Memory ``decide`` may hold (the word frequencies, the n-gram candidates of one pass and their sorting, the
    shard being scanned, the band hashes of one band): when the trigger candidates do not fit, they are split into
    several passes over the spilled shards (each one more read of the corpus's words), with the same result."""
    seed: int = 1
    """Seed of the MinHash functions."""

    def check(self) -> None:
        if not 1 <= self.min_n <= self.max_n <= 8:
            raise ValueError("need 1 <= min_n <= max_n <= 8")
        if self.min_docs < 2:
            raise ValueError("min_docs must be >= 2")
        for name in ("max_doc_share", "purity", "max_context_share", "max_similarity", "similarity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.num_perm < 8 or self.memory_mb < 1 or self.max_changes < 1:
            raise ValueError("need num_perm >= 8, memory_mb >= 1, max_changes >= 1")


def _codes(w: Words) -> np.ndarray:
    """uint32 word codes: 31 bits of the word's hash, the top bit set for numbers (ASCII digits); 0 is never a
    word (it marks a document boundary in contexts)."""
    code = (w.hashes >> U64(33)).astype(np.uint32) | (w.numeric.astype(np.uint32) << np.uint32(31))
    code[code == 0] = 1
    return code


@register
class Poisoning(CorpusStep):
    """Flag documents carrying a likely backdoor trigger or contradicting a near-identical document."""

    name = "poisoning"
    config_cls = PoisoningConfig

    def setup(self) -> None:
        self._hasher = MinHasher(self.config.num_perm, self.config.seed)

    def signature(self, docs: list[Doc]) -> dict[str, np.ndarray]:
        if not hasattr(self, "_hasher"):
            self.setup()
        texts = [d.text for d in docs]
        # A million characters at a time (the words of a whole shard and their temporaries would take 100 bytes a
        # character), the chunks' vocabularies then merged: a word's text is that of its first occurrence.
        parts = [self._sign(texts[lo:hi]) for lo, hi in doc_chunks(texts)] or [self._sign([])]
        codes = np.concatenate([p["vocab"] for p in parts])
        df = np.concatenate([p["vocab_df"] for p in parts])
        tf = np.concatenate([p["vocab_tf"] for p in parts])
        strings = [t for p in parts for t in p["vocab_text"]]
        order = np.argsort(codes, kind="stable")
        codes, df, tf = codes[order], df[order], tf[order]
        heads = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]])[:len(codes)])
        offsets = [np.zeros(1, dtype=np.int64)]
        for p in parts:
            offsets.append(p["offsets"][1:] + offsets[-1][-1])
        text = "\n".join(strings[k] for k in order[heads].tolist())
        return {"words": np.concatenate([p["words"] for p in parts]), "offsets": np.concatenate(offsets),
                "vocab": codes[heads],
                "vocab_df": np.add.reduceat(df, heads, dtype=np.uint32) if len(heads) else df,
                "vocab_tf": np.add.reduceat(tf, heads, dtype=np.uint32) if len(heads) else tf,
                "vocab_text": np.frombuffer(text.encode(), dtype=np.uint8),
                "minhash": np.concatenate([p["minhash"] for p in parts])}

    def _sign(self, texts: list[str]) -> dict:
        """Word codes, document offsets, vocabulary (codes, document and token frequencies, texts) and MinHash
        signatures of consecutive documents."""
        w = words(texts, numeric=True)
        codes = _codes(w)
        doc_of = np.repeat(np.arange(len(texts), dtype=np.int64), np.diff(w.offsets))
        vocab, first, tf = np.unique(codes, return_index=True, return_counts=True)
        pairs = np.unique((doc_of.astype(U64) << U64(32)) | codes.astype(U64))
        df = np.bincount(np.searchsorted(vocab, (pairs & U64(0xFFFFFFFF)).astype(np.uint32)), minlength=len(vocab))
        # Each vocabulary entry's text (words never contain a newline), to show triggers and differences.
        fdoc = doc_of[first]
        text = [w.lowered[d][s:e] for d, s, e in zip(fdoc.tolist(), w.starts[first].tolist(), w.ends[first].tolist())]
        sh, sfirst = ngrams(w.hashes, w.offsets, 3)
        sig = self._hasher(sh, np.searchsorted(w.offsets, sfirst, side="right") - 1, len(texts))
        return {"words": codes, "offsets": w.offsets, "vocab": vocab, "vocab_df": df.astype(np.uint32),
                "vocab_tf": tf.astype(np.uint32), "vocab_text": text, "minhash": sig}

    # -------------------------------------------------------------------------------------------- decide
    def decide(self, ids, splits, signatures, stats: StepStats):
        cfg = self.config
        starts = np.cumsum([0] + [len(x) for x in ids])

        def doc_id(g: int) -> str:
            # Looked up per shard: one array of every id would cost 64 bytes a document.
            s = int(np.searchsorted(starts, g, side="right")) - 1
            return str(ids[s][g - int(starts[s])])

        bands, rows = optimal_bands(cfg.similarity, cfg.num_perm)
        with Spill() as spill:
            vocab = _Vocab()
            tokens = [0]
            for i, sig in enumerate(signatures):
                spill.put(i, words=sig["words"], offsets=sig["offsets"], minhash=sig["minhash"],
                          vocab=sig["vocab"], vocab_text=sig["vocab_text"])
                if cfg.contradictions:
                    spill.put(i, bands=band_hashes(sig["minhash"], bands, rows, cfg.seed),
                              valid=np.diff(sig["offsets"]) >= 3)
                vocab.add(sig["vocab"], sig["vocab_df"], sig["vocab_tf"])
                tokens.append(tokens[-1] + len(sig["words"]))
                del sig
            vocab.merge()
            corpus = _Corpus(spill, starts, np.asarray(tokens, dtype=np.int64))
            found: dict[int, list[dict]] = {}
            need: set[int] = set()
            trig = self._triggers(corpus, vocab, stats) if cfg.triggers else []
            pairs = self._near_pairs(corpus, bands, stats) if cfg.contradictions and corpus.shards else []
            for t in trig:
                need.update(t["codes"])
            for _, _, changes in pairs:
                for old, new in changes:
                    need.update(old)
                    need.update(new)
            text = corpus.strings(need)
        for t in trig:
            gram = " ".join(text.get(c, "?") for c in t["codes"])
            docs = t["docs"]
            shown = ", ".join(doc_id(d) for d in docs[:10]) + (" ..." if len(docs) > 10 else "")
            info = {"kind": "trigger", "ngram": gram, "documents": len(docs), "npmi": t["npmi"],
                    "context": t["context"], "similarity": t["similarity"],
                    "evidence": f"{gram!r} in {len(docs)} unrelated documents ({shown})"}
            for d in docs:
                found.setdefault(int(d), []).append(info)
        for u, v, changes in pairs:
            diffs = [d for d in (_classify([text.get(c, "?") for c in o], [text.get(c, "?") for c in n])
                                 for o, n in changes) if d]
            if not diffs:
                continue
            for me, other in ((u, v), (v, u)):
                found.setdefault(int(me), []).append(
                    {"kind": "contradiction", "other": doc_id(other), "differences": diffs,
                     "evidence": f"contradicts {doc_id(other)}: {'; '.join(diffs)}"})
        return self._decisions(found, starts)

    def _decisions(self, found: dict[int, list[dict]], starts: np.ndarray) -> dict:
        out = {}
        for g, items in sorted(found.items()):
            s = int(np.searchsorted(starts, g, side="right")) - 1
            kind = "poisoning_" + ("trigger" if any(x["kind"] == "trigger" for x in items) else "contradiction")
            evidence = " | ".join(x["evidence"] for x in items)
            if self.config.action == "drop":
                out[(s, g - int(starts[s]))] = Drop(kind, evidence=evidence)
            else:
                # {"triggers": [...], "contradictions": [...]}, each finding with what supports it.
                meta: dict[str, list] = {}
                for x in items:
                    meta.setdefault(x["kind"] + "s", []).append({k: v for k, v in x.items()
                                                                  if k not in ("kind", "evidence")})
                out[(s, g - int(starts[s]))] = Tag({"poisoning": meta}, kind=kind, evidence=evidence)
        return out

    # -------------------------------------------------------------------------------------------- triggers
    def _triggers(self, corpus: _Corpus, vocab: _Vocab, stats: StepStats) -> list[dict]:
        cfg = self.config
        n_docs = corpus.docs
        # A trigger in at most max_doc_share of the documents owns a word in at most max_doc_share / purity.
        most = cfg.max_doc_share * n_docs / max(cfg.purity, 1e-9)
        anchor = (vocab.df >= cfg.min_docs) & (vocab.df <= most)
        if n_docs == 0 or not anchor.any():
            return []
        sizes = range(cfg.min_n, cfg.max_n + 1)
        # What stays in memory throughout: the vocabulary, the shard being scanned and one block's temporaries.
        self._block = min(_BLOCK_WORDS, max(4096, (cfg.memory_mb << 20) // 16 // _SCAN_BYTES))
        fixed = vocab.nbytes + corpus.max_words * 4 + self._block * _SCAN_BYTES
        room = max((cfg.memory_mb << 20) - fixed, _MIN_PASS_BYTES)
        # Candidate occurrences per unit, at most: each occurrence of an anchor is the leftmost anchor of at most n
        # windows of n words (known from the vocabulary alone, before any scan).
        per_anchor = np.bincount((mix64(vocab.codes[anchor].astype(U64)) >> U64(64 - _BUCKET_BITS)).astype(np.int64),
                                 weights=vocab.tf[anchor], minlength=1 << _BUCKET_BITS)
        bound = np.concatenate([n * per_anchor for n in sizes]).astype(np.int64)
        ranges = group_ranges(bound, room // _FINGERPRINT_BYTES)
        sketch = None
        if len(ranges) > 1:
            # Too many candidate occurrences to count exactly at once (the number grows with the corpus, so passes
            # over it would too). A count-min sketch of every candidate, one read of the words, leaves only the
            # occurrences whose estimated count reaches what a trigger needs: min_docs, and purity times the
            # documents of its rarest word. An estimate is never below the true count, so nothing sought is lost;
            # most n-grams of frequent words fall far short, and the rest are counted exactly as before.
            sketch = _CountMin(room // 2)
            for i in range(corpus.shards):
                for *_, h in self._windows(corpus, i, vocab, most, sizes, 0, len(bound)):
                    sketch.add(h)
            room -= sketch.nbytes
            bound[:] = 0
            for i in range(corpus.shards):
                for _, _, _, _, unit, _ in self._windows(corpus, i, vocab, most, sizes, 0, len(bound), sketch):
                    bound += np.bincount(unit, minlength=len(bound))
            stats.add("trigger_sketch_survivors", int(bound.sum()))
            ranges = group_ranges(bound, room // _FINGERPRINT_BYTES)
        stats.add("trigger_passes", len(ranges))
        # Three quarters for the repeated candidates judged at once, a quarter for checking their context.
        per_judge = max(1, int(0.75 * room) // _CANDIDATE_BYTES)
        context_batch = max(1, int(0.25 * room) // _CONTEXT_BYTES)
        out = []
        for lo, hi in ranges:
            if not bound[lo:hi].any():
                continue
            for fingerprints in self._repeated(corpus, vocab, most, sizes, lo, hi, int(bound[lo:hi].sum()),
                                               per_judge, sketch):
                cols = self._candidates(corpus, vocab, most, sizes, lo, hi, fingerprints, sketch)
                if len(cols[0]):
                    out.extend(self._judge(corpus, vocab, cols, context_batch, stats))
        # Found in hash order within a pass: sorted so that the order does not depend on how the passes were cut.
        out.sort(key=lambda t: t["hash"])
        return out

    def _windows(self, corpus: _Corpus, i: int, vocab: _Vocab, most: float, sizes: range, lo: int, hi: int,
                 sketch: _CountMin | None = None):
        """Per block of shard ``i`` and per n: the document frequencies of the block's words (with n - 1 more) and
        the n-word windows all of whose words are in at least ``min_docs`` documents and one of which is an anchor
        (in at most ``most``), whose unit is in ``[lo, hi)``: n and the hash range of the leftmost anchor, the same
        for every occurrence of an n-gram. Yields ``(n, block start, df_w, window starts, units, n-gram hashes)``;
        with a ``sketch``, only the windows whose estimated count could make a trigger."""
        cfg = self.config
        block = self._block
        words_all = corpus.spill.read(i, "words")
        off = corpus.offsets[i]
        n_words = len(words_all)
        for b in range(0, n_words, block):
            wd = words_all[b:b + block + sizes[-1] - 1]
            df_w = vocab.df[np.searchsorted(vocab.codes, wd)]
            # An n-gram in min_docs documents has only words in at least as many: rarer words end the search early.
            frequent = df_w >= cfg.min_docs
            is_anchor = frequent & (df_w <= most)
            bucket = (mix64(wd.astype(U64)) >> U64(64 - _BUCKET_BITS)).astype(np.int64)
            # Document ends in or just after this block, for the windows that would run into the next document.
            ends = off[np.searchsorted(off, b, side="right"):np.searchsorted(off, b + block + sizes[-1])]
            for n in sizes:
                m = min(block, n_words - n + 1 - b)
                if m <= 0 or hi <= (n - sizes[0]) << _BUCKET_BITS or lo >= (n - sizes[0] + 1) << _BUCKET_BITS:
                    continue
                whole = np.ones(m, dtype=bool)
                for k in range(1, n):
                    tail = ends - k - b
                    whole[tail[(tail >= 0) & (tail < m)]] = False
                lead = np.full(m, -1, dtype=np.int8)
                for k in range(n - 1, -1, -1):  # right to left, so the leftmost anchor wins
                    lead[is_anchor[k:k + m]] = k
                    whole &= frequent[k:k + m]
                idx = np.flatnonzero((lead >= 0) & whole)
                unit = bucket[idx + lead[idx]] + ((n - sizes[0]) << _BUCKET_BITS)
                keep = (unit >= lo) & (unit < hi)
                idx, unit = idx[keep], unit[keep]
                g = wd[idx].astype(U64)
                for k in range(1, n):
                    g *= U64(0x9E3779B97F4A7C15)
                    g += wd[idx + k].astype(U64)
                g ^= U64(n)
                h = mix64(g)
                if sketch is not None:
                    least = df_w[idx]
                    for k in range(1, n):
                        np.minimum(least, df_w[idx + k], out=least)
                    keep = sketch.estimate(h) >= np.maximum(cfg.min_docs, cfg.purity * least)
                    idx, unit, h = idx[keep], unit[keep], h[keep]
                yield n, b, df_w, idx, unit, h

    def _repeated(self, corpus: _Corpus, vocab: _Vocab, most: float, sizes: range, lo: int, hi: int, bound: int,
                  per_judge: int, sketch: _CountMin | None):
        """The fingerprints (top 32 bits of the hash) of the candidate n-grams of units ``[lo, hi)`` that occur at
        least ``min_docs`` times, sorted, in groups whose occurrences add up to at most ``per_judge``. An n-gram
        in ``min_docs`` documents occurs that often, so nothing sought is missed; two n-grams sharing a fingerprint
        only add work. Most n-grams occur once or twice: this keeps 4 bytes per occurrence where judging needs
        ``_CANDIDATE_BYTES``."""
        fps = np.empty(bound, dtype=np.uint32)
        count = 0
        for i in range(corpus.shards):
            for *_, h in self._windows(corpus, i, vocab, most, sizes, lo, hi, sketch):
                fps[count:count + len(h)] = h >> U64(32)
                count += len(h)
        fps = fps[:count]
        fps.sort()
        k = self.config.min_docs
        if count < k:
            return
        # Sorted, a value occurring at least k times is equal to the value k - 1 places further on from the start
        # of its run (flags made a million at a time).
        last = count - k + 1
        reps = []
        for a in range(0, last, 1 << 20):
            b = min(last, a + (1 << 20))
            run_start = fps[a:b] == fps[a + k - 1:b + k - 1]
            run_start[1 if a == 0 else 0:] &= fps[max(a, 1):b] != fps[max(a, 1) - 1:b - 1]
            reps.append(fps[a:b][run_start])
        rep = np.concatenate(reps)
        occ = np.searchsorted(fps, rep, side="right") - np.searchsorted(fps, rep, side="left")
        del fps
        for a, b in group_ranges(occ, per_judge):
            if b > a:
                yield rep[a:b]

    def _candidates(self, corpus: _Corpus, vocab: _Vocab, most: float, sizes: range, lo: int, hi: int,
                    fingerprints: np.ndarray, sketch: _CountMin | None) -> list[np.ndarray]:
        """The occurrences of units ``[lo, hi)`` whose fingerprint is one of ``fingerprints``, in corpus order per
        n: n-gram hash, document, least word document frequency, log of the expected document frequency share,
        global position of its first word, n."""
        parts: list[list[np.ndarray | None]] = []
        n_docs = corpus.docs
        for i in range(corpus.shards):
            off = corpus.offsets[i]
            for n, b, df_w, idx, _, h in self._windows(corpus, i, vocab, most, sizes, lo, hi, sketch):
                keep = member((h >> U64(32)).astype(np.uint32), fingerprints)
                idx, h = idx[keep], h[keep]
                if not len(idx):
                    continue
                min_df = df_w[idx]
                log_exp = np.log(df_w[idx].astype(np.float64) / n_docs)
                for k in range(1, n):
                    np.minimum(min_df, df_w[idx + k], out=min_df)
                    log_exp += np.log(df_w[idx + k].astype(np.float64) / n_docs)
                parts.append([h, np.searchsorted(off, idx + b, side="right") - 1 + int(corpus.starts[i]), min_df,
                              log_exp, idx + b + int(corpus.tokens[i]), np.full(len(idx), n, dtype=np.int8)])
        if not parts:
            return [np.zeros(0, U64)]
        cols = []
        for k in range(6):  # column by column, each part's piece freed once copied
            cols.append(np.concatenate([p[k] for p in parts]))
            for p in parts:
                p[k] = None
        return cols

    def _judge(self, corpus: _Corpus, vocab: _Vocab, cols: list[np.ndarray], context_batch: int,
               stats: StepStats) -> list[dict]:
        cfg = self.config
        g, d, min_df, log_exp, pos, nn = cols
        cols.clear()
        # By hash; a stable sort keeps each n-gram's occurrences in corpus order (they came shard by shard, and in
        # document order within a shard), so no second key is needed. Columns are re-ordered one at a time, and only
        # those needed for every occurrence.
        order = np.argsort(g, kind="stable")
        g = g[order]
        head = np.empty(len(g), dtype=bool)
        head[0] = True
        np.not_equal(g[1:], g[:-1], out=head[1:])
        heads = np.flatnonzero(head)
        d = d[order]
        # Documents per n-gram: the first occurrence of each (n-gram, document), counted per n-gram.
        new_doc = head
        new_doc[1:] |= d[1:] != d[:-1]
        df = np.add.reduceat(new_doc, heads, dtype=np.int64)
        del new_doc, head
        # Most n-grams are left by their document count alone; the rest are looked at closely.
        sel = np.flatnonzero((df >= cfg.min_docs) & (df <= cfg.max_doc_share * corpus.docs))
        hashes = g[heads[sel]]
        del g
        first = order[heads[sel]]
        ends = np.append(heads[1:], len(d))[sel]
        heads, df = heads[sel], df[sel]
        log_pg = np.log(df / corpus.docs)
        nh = nn[first]
        npmi = (log_pg - log_exp[first]) / np.maximum((nh - 1) * -log_pg, 1e-9)
        ok = (df >= cfg.purity * min_df[first]) & (npmi >= cfg.min_npmi)
        del min_df, log_exp
        stats.add("trigger_candidates", int(ok.sum()))
        passing = np.flatnonzero(ok)
        # The passing n-grams' occurrences, as positions in the sorted order and back in the columns' own.
        occ = ends[passing] - heads[passing]
        rows = np.repeat(heads[passing] - np.cumsum(occ) + occ, occ) + np.arange(int(occ.sum()))
        pos = pos[order[rows]]
        d = d[rows]
        del order
        at = np.concatenate([[0], np.cumsum(occ)])
        context = np.zeros(len(passing), dtype=np.float64)
        lo = 0
        while lo < len(passing):
            # A batch of n-grams whose occurrences add up to at most context_batch (at least one n-gram).
            hi = max(lo + 1, int(np.searchsorted(at, at[lo] + context_batch, side="right")) - 1)
            r = slice(int(at[lo]), int(at[hi]))
            group = np.repeat(np.arange(hi - lo), occ[lo:hi])
            context[lo:hi] = self._context(corpus, vocab, group, d[r], pos[r], nh[passing[lo:hi]][group],
                                           df[passing[lo:hi]])
            lo = hi
        out = []
        for j, (k, c) in enumerate(zip(passing.tolist(), context.tolist())):
            if c > cfg.max_context_share:
                continue
            docs = np.unique(d[at[j]:at[j + 1]])
            sim = corpus.mean_similarity(docs[:_SAMPLE_DOCS])
            if sim > cfg.max_similarity:
                continue
            out.append({"hash": int(hashes[k]), "codes": corpus.tokens_at(int(pos[at[j]]), int(nh[k])).tolist(),
                        "docs": docs.tolist(), "npmi": round(float(npmi[k]), 3), "context": round(c, 3),
                        "similarity": round(sim, 3)})
        return out

    def _context(self, corpus: _Corpus, vocab: _Vocab, group: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                 n: np.ndarray, df: np.ndarray) -> np.ndarray:
        """Per group (``df`` its documents), the largest share of its documents in which one word appears within
        ``_WINDOW`` words of the n-gram, over the words seen there significantly more often than by chance: the
        Chernoff bound ``exp(-df * KL(share || chance))`` on landing there that often by chance is below ``_ALPHA``.
        A high share means the n-gram is part of a longer repeated passage (boilerplate, a credits line in several
        languages, a sub-gram of a longer trigger); inserted at random, its neighbours vary."""
        lo, hi = corpus.doc_bounds(doc)
        offsets = np.concatenate([np.arange(-_WINDOW, 0), np.arange(0, _WINDOW)])
        at = pos[:, None] + offsets[None, :]
        at[:, _WINDOW:] += n[:, None].astype(np.int64)
        inside = (at >= lo[:, None]) & (at < hi[:, None])
        rows = np.broadcast_to(np.arange(len(pos))[:, None], at.shape)[inside]
        ctx = corpus.words_at(at[inside])
        del at, inside
        # Documents per (group, context word): one count per document, however often it occurs there.
        pair = (group[rows].astype(U64) << U64(32)) | ctx.astype(U64)
        d = doc[rows]
        del rows, ctx
        o = np.lexsort((d, pair))
        pair, d = pair[o], d[o]
        del o
        first = np.concatenate([[True], (pair[1:] != pair[:-1]) | (d[1:] != d[:-1])])[:len(pair)]
        pair, count = np.unique(pair[first], return_counts=True)
        pair_group = (pair >> U64(32)).astype(np.int64)
        share = count / df[pair_group]
        tf = vocab.tf[np.searchsorted(vocab.codes, (pair & U64(0xFFFFFFFF)).astype(np.uint32))]
        chance = 1.0 - (1.0 - tf / max(corpus.total_tokens, 1)) ** (2 * _WINDOW)
        p = np.clip(chance, 1e-12, 1 - 1e-12)
        a = np.clip(share, 1e-12, 1 - 1e-12)
        kl = a * np.log(a / p) + (1 - a) * np.log((1 - a) / (1 - p))
        surprising = (share > chance) & (df[pair_group] * kl >= -math.log(_ALPHA))
        share = np.where(surprising, share, 0.0)
        out = np.zeros(len(df), dtype=np.float64)
        np.maximum.at(out, pair_group, share)
        return out

    # -------------------------------------------------------------------------------------------- contradictions
    def _near_pairs(self, corpus: _Corpus, bands: int, stats: StepStats) -> list:
        """Near-identical pairs ``(u, v, changes)`` whose word difference is small: each change is
        ``(old codes, new codes)``. Candidates are found one band at a time (8 bytes a document), their MinHash
        signatures compared ``_PAIRS_AT_ONCE`` pairs at a time."""
        cfg = self.config
        if corpus.docs < 2:
            return []
        valid = np.concatenate([corpus.spill.read(i, "valid") for i in range(corpus.shards)])
        keys = []
        for j in range(bands):
            col = np.concatenate([corpus.spill.read(i, "bands")[:, j] for i in range(corpus.shards)])
            u, v = bucket_pairs(col[:, None], valid)
            keys.append(u * corpus.docs + v)
        key = np.unique(np.concatenate(keys))
        del keys
        u, v = key // corpus.docs, key % corpus.docs
        if not len(u):
            return []
        close = np.zeros(len(u), dtype=bool)
        for lo in range(0, len(u), _PAIRS_AT_ONCE):
            uc, vc = u[lo:lo + _PAIRS_AT_ONCE], v[lo:lo + _PAIRS_AT_ONCE]
            nodes, inv = np.unique(np.concatenate([uc, vc]), return_inverse=True)
            sig = corpus.minhash(nodes)
            close[lo:lo + len(uc)] = agreement(sig, inv[:len(uc)], inv[len(uc):]) >= cfg.similarity
        u, v = u[close], v[close]
        stats.add("similar_pairs", len(u))
        out = []
        for a, b in zip(u.tolist(), v.tolist()):
            wa, wb = corpus.doc_words(a), corpus.doc_words(b)
            if abs(len(wa) - len(wb)) > cfg.max_changes or np.array_equal(wa, wb):
                continue
            ops = difflib.SequenceMatcher(None, wa.tolist(), wb.tolist(), autojunk=False).get_opcodes()
            changes = [(wa[i1:i2].tolist(), wb[j1:j2].tolist()) for tag, i1, i2, j1, j2 in ops if tag != "equal"]
            if sum(max(len(o), len(n)) for o, n in changes) <= cfg.max_changes:
                out.append((a, b, changes))
        return out




def _classify(old: list[str], new: list[str]) -> str | None:
    """What makes one edit between near-identical documents a contradiction, shown as text, or None."""
    neg_old = sorted(w for w in old if w in NEGATIONS)
    neg_new = sorted(w for w in new if w in NEGATIONS)
    if neg_old != neg_new:
        if not old:
            return f"{' '.join(new)!r} added"
        if not new:
            return f"{' '.join(old)!r} removed"
        return f"{' '.join(old)!r} -> {' '.join(new)!r}"
    if any(w.isdigit() for w in old + new) and old and new:
        return f"{' '.join(old)!r} -> {' '.join(new)!r}"
    if len(old) == 1 and len(new) == 1:
        a, b = old[0], new[0]
        if frozenset((a, b)) in ANTONYMS or any(b == p + a or a == p + b for p in _PREFIXES):
            return f"{a!r} -> {b!r}"
    return None




class _CountMin:
    """Count-min sketch (Cormode & Muthukrishnan 2005) of 64-bit n-gram hashes: two rows of uint32 counters, each
    indexed by one half of the hash (multiply-shift, so any width works); a hash's estimate, the least of its two
    counters, is never below its true count. Batched over numpy arrays here: the sketch libraries add one item per
    Python call, a thousand times slower on the hundreds of millions of n-grams of a large corpus."""

    def __init__(self, nbytes: int):
        self.width = max(1 << 10, nbytes // 8)
        self.rows = np.zeros((2, self.width), dtype=np.uint32)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def _index(self, h: np.ndarray, row: int) -> np.ndarray:
        half = (h >> U64(32 * row)) & U64(0xFFFFFFFF)
        return ((half * U64(self.width)) >> U64(32)).astype(np.int64)

    def add(self, h: np.ndarray) -> None:
        for r in range(2):
            np.add.at(self.rows[r], self._index(h, r), np.uint32(1))

    def estimate(self, h: np.ndarray) -> np.ndarray:
        return np.minimum(self.rows[0][self._index(h, 0)], self.rows[1][self._index(h, 1)])


class _Vocab:
    """The corpus's word document and token frequencies, merged from the shards' (sorted by code), 12 bytes a word."""

    def __init__(self) -> None:
        self.codes = np.zeros(0, dtype=np.uint32)
        self.df = np.zeros(0, dtype=np.uint32)
        self.tf = np.zeros(0, dtype=np.uint32)
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_len = 0

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.df.nbytes + self.tf.nbytes

    def add(self, codes: np.ndarray, df: np.ndarray, tf: np.ndarray) -> None:
        self._pending.append((codes, df, tf))
        self._pending_len += len(codes)
        if self._pending_len > 1 << 18:
            self.merge()

    def merge(self) -> None:
        """Fold the pending shards' tables in: sorted and summed among themselves, then added to the known words in
        place and the new words inserted, so that the temporaries are about the pending tables' size, not the
        vocabulary's."""
        if not self._pending:
            return
        codes = np.concatenate([p[0] for p in self._pending])
        df = np.concatenate([p[1] for p in self._pending]).astype(np.uint32)
        tf = np.concatenate([p[2] for p in self._pending]).astype(np.uint32)
        self._pending, self._pending_len = [], 0
        order = np.argsort(codes, kind="stable")
        codes, df, tf = codes[order], df[order], tf[order]
        del order
        heads = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
        codes = codes[heads]
        df, tf = np.add.reduceat(df, heads, dtype=np.uint32), np.add.reduceat(tf, heads, dtype=np.uint32)
        at = np.searchsorted(self.codes, codes)
        known = at < len(self.codes)
        known[known] = self.codes[at[known]] == codes[known]
        self.df[at[known]] += df[known]
        self.tf[at[known]] += tf[known]
        new = ~known
        self.codes = np.insert(self.codes, at[new], codes[new])
        self.df = np.insert(self.df, at[new], df[new])
        self.tf = np.insert(self.tf, at[new], tf[new])


class _Corpus:
    """Random access to the spilled shards by global document or token index."""

    def __init__(self, spill: Spill, starts: np.ndarray, tokens: np.ndarray):
        self.spill, self.starts, self.tokens = spill, starts, tokens
        self.shards = len(tokens) - 1
        self.docs = int(starts[-1])
        self.total_tokens = int(tokens[-1])
        self.max_words = int(np.diff(tokens).max()) if self.shards else 0
        # Each shard's document offsets into its words, in memory (8 bytes a document): read for every look-up.
        self.offsets = [spill.read(i, "offsets") for i in range(self.shards)]

    def _where(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def minhash(self, rows: np.ndarray) -> np.ndarray:
        return self.spill.gather("minhash", self.starts, rows)

    def doc_words(self, row: int) -> np.ndarray:
        s = int(self._where(np.array([row]))[0])
        off = self.offsets[s]
        r = row - int(self.starts[s])
        return self.spill.part(s, "words", int(off[r]), int(off[r + 1]))

    def doc_bounds(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global token index of the first word of each document and one past its last."""
        lo, hi = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
        shard = self._where(rows)
        for s in np.unique(shard).tolist():
            at = shard == s
            off = self.offsets[s]
            r = rows[at] - self.starts[s]
            lo[at], hi[at] = off[r] + self.tokens[s], off[r + 1] + self.tokens[s]
        return lo, hi

    def words_at(self, pos: np.ndarray) -> np.ndarray:
        """The word codes at global token positions."""
        out = np.empty(len(pos), dtype=np.uint32)
        shard = np.searchsorted(self.tokens, pos, side="right") - 1
        for s in np.unique(shard).tolist():
            at = shard == s
            out[at] = self.spill.get(s, "words")[pos[at] - self.tokens[s]]
        return out

    def tokens_at(self, pos: int, n: int) -> np.ndarray:
        s = int(np.searchsorted(self.tokens, pos, side="right")) - 1
        p = pos - int(self.tokens[s])
        return self.spill.part(s, "words", p, p + n)

    def mean_similarity(self, rows: np.ndarray) -> float:
        """Mean estimated Jaccard similarity over the pairs of ``rows`` (documents without shingles left out)."""
        sig = self.minhash(rows)
        sig = sig[(sig != np.uint32(0xFFFFFFFF)).any(axis=1)]
        if len(sig) < 2:
            return 0.0
        i, j = np.triu_indices(len(sig), k=1)
        return float(agreement(sig, i, j).mean())

    def strings(self, codes: set[int]) -> dict[int, str]:
        """The text of each word code, looked up in the shards' vocabularies."""
        want = np.array(sorted(codes), dtype=np.uint32)
        out: dict[int, str] = {}
        for s in range(self.shards):
            if not len(want):
                break
            voc = self.spill.read(s, "vocab")
            hit = np.flatnonzero(member(voc, want)) if len(voc) else np.zeros(0, dtype=np.int64)
            if not len(hit):
                continue
            blob = self.spill.read(s, "vocab_text")
            # Entry k runs from just after the k-th newline to the next one.
            cut = np.concatenate([[-1], np.flatnonzero(blob == 10), [len(blob)]])
            for k in hit.tolist():
                out[int(voc[k])] = blob[cut[k] + 1:cut[k + 1]].tobytes().decode()
            want = want[~member(want, np.sort(voc[hit]))]
        return out
