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
know which words are rare before it has seen them all. So ``decide`` makes two passes: the first merges the
shards' word document frequencies (the vocabulary, which grows far slower than the corpus, Heaps' law) and
spills the shards' word sequences (4 bytes a word) to a temporary folder; the second builds only the n-grams
made of words in at least ``min_docs`` documents around an *anchor* word (in at most ``max_doc_share / purity``
of the documents: a trigger must own one), partitioned by the anchor's hash into as many passes as
``memory_mb`` requires (a partitioned hash join). This is exact, where sampling n-gram hashes or a count-min
sketch would miss or merge the rare n-grams that are sought.

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
_CANDIDATE_BYTES = 48
"""Memory per candidate n-gram occurrence in the trigger pass (hash, document, position, frequencies, sorting)."""
_WINDOW = 5
"""Words on each side of a trigger occurrence whose consistency marks a longer repeated passage."""
_ALPHA = 1e-3
"""Chance level below which a word's presence near an n-gram counts as the n-gram's fixed context."""


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
    memory_mb: int = 512
    """Memory for the trigger candidates of one pass; more candidates are split into several passes."""
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
        w = words([d.text for d in docs], numeric=True)
        codes = _codes(w)
        doc_of = np.repeat(np.arange(len(docs), dtype=np.int64), np.diff(w.offsets))
        vocab, first, tf = np.unique(codes, return_index=True, return_counts=True)
        pairs = np.unique((doc_of.astype(U64) << U64(32)) | codes.astype(U64))
        df = np.bincount(np.searchsorted(vocab, (pairs & U64(0xFFFFFFFF)).astype(np.uint32)), minlength=len(vocab))
        # Each vocabulary entry's text (words never contain a newline), to show triggers and differences.
        fdoc = doc_of[first]
        text = "\n".join(w.lowered[d][s:e] for d, s, e in zip(fdoc.tolist(), w.starts[first].tolist(),
                                                              w.ends[first].tolist()))
        sh, sfirst = ngrams(w.hashes, w.offsets, 3)
        sig = self._hasher(sh, np.searchsorted(w.offsets, sfirst, side="right") - 1, len(docs))
        return {"words": codes, "offsets": w.offsets, "vocab": vocab, "vocab_df": df.astype(np.uint32),
                "vocab_tf": tf.astype(np.uint32), "vocab_text": np.frombuffer(text.encode(), dtype=np.uint8),
                "minhash": sig}

    # -------------------------------------------------------------------------------------------- decide
    def decide(self, ids, splits, signatures, stats: StepStats):
        cfg = self.config
        starts = np.cumsum([0] + [len(x) for x in ids])
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=str)
        bands, rows = optimal_bands(cfg.similarity, cfg.num_perm)
        with Spill() as spill:
            vocab = _Vocab()
            band_l, valid_l, tokens = [], [], [0]
            for i, sig in enumerate(signatures):
                spill.put(i, words=sig["words"], offsets=sig["offsets"], minhash=sig["minhash"],
                          vocab=sig["vocab"], vocab_text=sig["vocab_text"])
                vocab.add(sig["vocab"], sig["vocab_df"], sig["vocab_tf"])
                if cfg.contradictions:
                    band_l.append(band_hashes(sig["minhash"], bands, rows, cfg.seed))
                    valid_l.append(np.diff(sig["offsets"]) >= 3)
                tokens.append(tokens[-1] + len(sig["words"]))
            vocab.merge()
            corpus = _Corpus(spill, starts, np.asarray(tokens, dtype=np.int64))
            found: dict[int, list[dict]] = {}
            need: set[int] = set()
            trig = self._triggers(corpus, vocab, stats) if cfg.triggers else []
            pairs = self._near_pairs(corpus, band_l, valid_l, stats) if cfg.contradictions and band_l else []
            del band_l
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
            shown = ", ".join(str(flat_ids[d]) for d in docs[:10]) + (" ..." if len(docs) > 10 else "")
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
                    {"kind": "contradiction", "other": str(flat_ids[other]), "differences": diffs,
                     "evidence": f"contradicts {flat_ids[other]}: {'; '.join(diffs)}"})
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
        anchor = (vocab.df >= cfg.min_docs) & (vocab.df <= cfg.max_doc_share * n_docs / max(cfg.purity, 1e-9))
        anchors = vocab.codes[anchor]
        if not len(anchors) or n_docs == 0:
            return []
        sizes = range(cfg.min_n, cfg.max_n + 1)
        need = float(vocab.tf[anchor].sum()) * sum(sizes) * _CANDIDATE_BYTES
        parts = max(1, math.ceil(need / (cfg.memory_mb << 20)))
        stats.add("trigger_passes", parts)
        log_p = np.log(vocab.df.astype(np.float64) / n_docs)
        out = []
        for p in range(parts):
            cands = [c for i in range(corpus.shards)
                     for c in self._candidates(corpus, i, vocab, anchors, log_p, sizes, p, parts)]
            if cands:
                out.extend(self._judge(corpus, vocab, [np.concatenate(x) for x in zip(*cands)], stats))
        return out

    def _candidates(self, corpus: _Corpus, i: int, vocab: _Vocab, anchors: np.ndarray, log_p: np.ndarray,
                    sizes: range, part: int, parts: int):
        """The n-gram occurrences of shard ``i`` whose leftmost anchor word falls in hash partition ``part``
        (so each distinct n-gram is built in exactly one partition), with what judging them needs."""
        wd = np.asarray(corpus.spill.get(i, "words"))
        off = np.asarray(corpus.spill.get(i, "offsets"))
        n_words = len(wd)
        if n_words == 0:
            return
        doc_of = np.repeat(np.arange(len(off) - 1, dtype=np.int64), np.diff(off))
        at = np.searchsorted(vocab.codes, wd)
        df_w, lp = vocab.df[at], log_p[at]
        is_anchor = member(wd, anchors)
        in_part = is_anchor & ((mix64(wd.astype(U64)) % U64(parts)).astype(np.int64) == part)
        # An n-gram in min_docs documents has only words in at least as many: rarer words end the search early.
        frequent = df_w >= self.config.min_docs
        for n in sizes:
            m = n_words - n + 1
            if m <= 0:
                continue
            lead = np.full(m, -1, dtype=np.int64)
            whole = doc_of[:m] == doc_of[n - 1:n - 1 + m]
            for k in range(n - 1, -1, -1):  # right to left, so the leftmost anchor wins
                lead[is_anchor[k:k + m]] = k
                whole &= frequent[k:k + m]
            idx = np.flatnonzero((lead >= 0) & whole)
            idx = idx[in_part[idx + lead[idx]]]
            if not len(idx):
                continue
            g = wd[idx].astype(U64)
            min_df, log_exp = df_w[idx].copy(), lp[idx].copy()
            for k in range(1, n):
                g = g * U64(0x9E3779B97F4A7C15) + wd[idx + k].astype(U64)
                np.minimum(min_df, df_w[idx + k], out=min_df)
                log_exp += lp[idx + k]
            yield (mix64(g ^ U64(n)), doc_of[idx] + int(corpus.starts[i]), min_df, log_exp,
                   idx + int(corpus.tokens[i]), np.full(len(idx), n, dtype=np.int8))

    def _judge(self, corpus: _Corpus, vocab: _Vocab, cols: list[np.ndarray], stats: StepStats) -> list[dict]:
        cfg = self.config
        g, d, min_df, log_exp, pos, nn = cols
        order = np.lexsort((d, g))
        g, d, pos, nn = g[order], d[order], pos[order], nn[order]
        head = np.concatenate([[True], g[1:] != g[:-1]])
        group = np.cumsum(head) - 1
        new_doc = head | np.concatenate([[True], d[1:] != d[:-1]])
        df = np.bincount(group, weights=new_doc).astype(np.int64)
        first = order[head]
        log_pg = np.log(df / corpus.docs)
        npmi = (log_pg - log_exp[first]) / np.maximum((nn[head] - 1) * -log_pg, 1e-9)
        ok = ((df >= cfg.min_docs) & (df <= cfg.max_doc_share * corpus.docs) & (df >= cfg.purity * min_df[first])
              & (npmi >= cfg.min_npmi))
        stats.add("trigger_candidates", int(ok.sum()))
        if not ok.any():
            return []
        keep = ok[group]
        context = self._context(corpus, vocab, group[keep], d[keep], pos[keep], nn[keep], df)
        ok &= context <= cfg.max_context_share
        out = []
        for k in np.flatnonzero(ok).tolist():
            docs = np.unique(d[group == k])
            sim = corpus.mean_similarity(docs[:_SAMPLE_DOCS])
            if sim > cfg.max_similarity:
                continue
            at = int(np.flatnonzero(head)[k])
            out.append({"codes": corpus.tokens_at(int(pos[at]), int(nn[at])).tolist(), "docs": docs.tolist(),
                        "npmi": round(float(npmi[k]), 3), "context": round(float(context[k]), 3),
                        "similarity": round(sim, 3)})
        return out

    def _context(self, corpus: _Corpus, vocab: _Vocab, group: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                 n: np.ndarray, df: np.ndarray) -> np.ndarray:
        """Per group, the largest share of its documents in which one word appears within ``_WINDOW`` words of the
        n-gram, over the words seen there significantly more often than by chance: the Chernoff bound
        ``exp(-df * KL(share || chance))`` on landing there that often by chance is below ``_ALPHA``. A high share
        means the n-gram is part of a longer repeated passage (boilerplate, a credits line in several languages,
        a sub-gram of a longer trigger); inserted at random, its neighbours vary."""
        lo, hi = corpus.doc_bounds(doc)
        offsets = np.concatenate([np.arange(-_WINDOW, 0), np.arange(0, _WINDOW)])
        at = pos[:, None] + offsets[None, :]
        at[:, _WINDOW:] += n[:, None].astype(np.int64)
        inside = (at >= lo[:, None]) & (at < hi[:, None])
        rows = np.broadcast_to(np.arange(len(pos))[:, None], at.shape)[inside]
        ctx = corpus.words_at(at[inside])
        # Documents per (group, context word): one count per document, however often it occurs there.
        pair = (group[rows].astype(U64) << U64(32)) | ctx.astype(U64)
        d = doc[rows]
        o = np.lexsort((d, pair))
        pair, d = pair[o], d[o]
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
    def _near_pairs(self, corpus: _Corpus, band_l, valid_l, stats: StepStats) -> list:
        """Near-identical pairs ``(u, v, changes)`` whose word difference is small: each change is
        ``(old codes, new codes)``."""
        cfg = self.config
        u, v = bucket_pairs(np.concatenate(band_l), np.concatenate(valid_l))
        if not len(u):
            return []
        nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
        sig = corpus.minhash(nodes)
        close = agreement(sig, inv[:len(u)], inv[len(u):]) >= cfg.similarity
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




class _Vocab:
    """The corpus's word document and token frequencies, merged from the shards' (sorted by code)."""

    def __init__(self) -> None:
        self.codes = np.zeros(0, dtype=np.uint32)
        self.df = np.zeros(0, dtype=np.int64)
        self.tf = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_len = 0

    def add(self, codes: np.ndarray, df: np.ndarray, tf: np.ndarray) -> None:
        self._pending.append((codes, df, tf))
        self._pending_len += len(codes)
        if self._pending_len > max(len(self.codes), 1 << 20):
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        codes = np.concatenate([self.codes] + [p[0] for p in self._pending])
        codes, inv = np.unique(codes, return_inverse=True)
        self.df = np.bincount(inv, weights=np.concatenate([self.df] + [p[1] for p in self._pending]),
                              minlength=len(codes)).astype(np.int64)
        self.tf = np.bincount(inv, weights=np.concatenate([self.tf] + [p[2] for p in self._pending]),
                              minlength=len(codes)).astype(np.int64)
        self.codes = codes
        self._pending, self._pending_len = [], 0


class _Corpus:
    """Random access to the spilled shards by global document or token index."""

    def __init__(self, spill: Spill, starts: np.ndarray, tokens: np.ndarray):
        self.spill, self.starts, self.tokens = spill, starts, tokens
        self.shards = len(tokens) - 1
        self.docs = int(starts[-1])
        self.total_tokens = int(tokens[-1])

    def _where(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def minhash(self, rows: np.ndarray) -> np.ndarray:
        shard = self._where(rows)
        out = None
        for s in np.unique(shard).tolist():
            sig = self.spill.get(s, "minhash")
            at = shard == s
            if out is None:
                out = np.empty((len(rows), sig.shape[1]), dtype=sig.dtype)
            out[at] = sig[rows[at] - self.starts[s]]
        return out

    def doc_words(self, row: int) -> np.ndarray:
        s = int(self._where(np.array([row]))[0])
        off = self.spill.get(s, "offsets")
        r = row - int(self.starts[s])
        return np.asarray(self.spill.get(s, "words")[off[r]:off[r + 1]])

    def doc_bounds(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global token index of the first word of each document and one past its last."""
        lo, hi = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
        shard = self._where(rows)
        for s in np.unique(shard).tolist():
            at = shard == s
            off = np.asarray(self.spill.get(s, "offsets"))
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
        return np.asarray(self.spill.get(s, "words")[p:p + n])

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
            voc = np.asarray(self.spill.get(s, "vocab"))
            hit = np.flatnonzero(member(voc, want)) if len(voc) else np.zeros(0, dtype=np.int64)
            if not len(hit):
                continue
            text = bytes(self.spill.get(s, "vocab_text")).decode().split("\n")
            for k in hit.tolist():
                out[int(voc[k])] = text[k]
            want = want[~member(want, np.sort(voc[hit]))]
        return out
