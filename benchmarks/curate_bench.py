"""Curation: stemma's near-deduplication, Gopher rules and whole pipeline against datatrove and datasketch.

One run measures three things on this machine:

1. Near-deduplication on a labelled set made here from the shipped corpus (fixed seed): its documents cut into
   pieces of at most 3,500 characters, pieces that already resemble an earlier one dropped (exact Jaccard of word
   5-gram sets >= 0.5, so the labels hold), then 30% of them copied once (a quarter of those twice) with a few
   percent of words replaced, deleted or inserted, adjacent sentences (or words) swapped, or the last 10% cut.
   More documents made of paragraphs drawn from across the corpus join the originals (1,500 quick, 20,000 full).
   Contenders, all on word 5-grams and 112 permutations, each as its user gets it, the set given as the same JSONL
   files:
   - stemma: `Curation` with the one step ``near_dedup`` at its defaults (threshold 0.7, verified candidates, so
     the banding it derives is 18 x 6) on a `LocalExecutor(2)` (reading, shards, two passes, writing the output:
     what a user runs); also the step alone (`signature` and `decide` in one process), and the step with
     datatrove's algorithm exactly (its 14 x 8 banding, no verification: every bucket collision is a duplicate);
   - datatrove 0.10.1: its four MinHash stages (signature, buckets, cluster, filter) run by `LocalPipelineExecutor`
     with 2 workers at its default `MinhashConfig` (14 x 8, whose S-curve is 50% at Jaccard 0.72: the threshold
     equivalent to stemma's 0.7), reading the JSONL and writing the kept documents (uncompressed, as stemma
     writes them);
   - datasketch: one process, per document ``MinHash(num_perm).update`` per shingle, ``MinHashLSH.query`` and
     ``insert`` when nothing matched (reading the JSONL included), on stemma's banding (the same work).
   Scoring: within each labelled group (an original and its copies) exactly ``size - 1`` documents should go, no
   matter which. A removed document is a true positive while its group still has a removal due, otherwise (a
   document without copies, or the last member of a group) a false positive; each removal due and not made is a
   false negative. F1 over those counts. Times: wall seconds (median of alternating rounds: 1 quick, 3 full) and
   CPU seconds of every process involved (sampled with psutil: what other load on the machine does not change).
2. Gopher's quality rules: stemma's ``gopher_quality`` step against datatrove's ``GopherQualityFilter`` with the
   same thresholds on every document of the shipped corpus as stemma reads it: agreement of keep/drop decisions,
   documents per CPU second (one process each, best of three rounds; datatrove's one round in quick mode).
3. The whole pipeline, every registered step, on a corpus generated from the shipped one (documents of 6-20 prose
   paragraphs drawn from it, their words scrambled, plus 5% exact and 10% edited copies), run in a child process:
   MB/s per core (MB read / wall seconds / 2 workers), MB per CPU second, and the peak resident memory of the
   child's driver and its workers (psutil, sampled every 0.1 s). Quick: 16 MB; full: 2 GB.

    python benchmarks/curate_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import regex

import stemma.data.curate.steps  # noqa: F401 - registers every step
from stemma.data.curate import CurateContext, Doc, Drop, StepStats, get, names, parse_steps
from stemma.data.curate.pipeline import Curation, IngestOptions, LocalExecutor
from stemma.data.read import ReadOptions, chunk, normalise, read_documents
from stemma.errors import DataError

# _common is imported in `main` only: it imports torch, and every worker process both pipelines start imports this
# module again (a worker of the `stemma` command does not import torch either).
CORPUS = Path(__file__).resolve().parents[1] / "examples" / "demo" / "corpus"
SEED = 20240611
WORKERS = 2
PIECE_CHARS = 3500
WORD = regex.compile(r"[\p{L}\p{N}\p{M}]+")
"""Words as stemma's shingles see them (runs of letters, digits, marks of the lowercased text)."""
SENTENCE_END = regex.compile(r"(?<=[.!?])\s+")
PIPELINE_ORDER = ("license", "language", "gopher_quality", "gopher_repetition", "c4", "exact_dedup", "near_dedup",
                  "pii", "bias", "poisoning", "decontaminate")
"""Cheap per-document filters first (fewer documents reach the corpus steps), as FineWeb orders its pipeline."""


# ------------------------------------------------------------------------------------------------ the labelled set
def corpus_pieces() -> list[str]:
    """The shipped corpus normalised and cut into pieces of at most PIECE_CHARS characters (>= 400 kept)."""
    out = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                out.extend(p for p in chunk(normalise(json.loads(line)["text"]), PIECE_CHARS) if len(p) >= 400)
    return out


def shingle_set(text: str, n: int = 5) -> set[str]:
    """The word 5-grams of a text, as the datasketch loop hashes them (a text of fewer words: all its words)."""
    w = WORD.findall(text.lower())
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def shingle_ids(text: str) -> set[int]:
    """The same 5-grams as Python hashes of word tuples: faster, for exact Jaccard similarities within this run."""
    w = WORD.findall(text.lower())
    return set(map(hash, zip(w, w[1:], w[2:], w[3:], w[4:]))) or {hash(tuple(w))}


def distinct(texts: list[str], max_jaccard: float = 0.5) -> list[str]:
    """Texts whose exact word 5-gram Jaccard with every earlier kept text is below ``max_jaccard`` (man pages share
    boilerplate sections: without this, the labels would call natural near-copies distinct)."""
    sets = [shingle_ids(t) for t in texts]
    freq = Counter(g for s in sets for g in s)
    # Prefix filtering (Chaudhuri et al. 2006): under one global order, rarest shingles first, two sets with
    # Jaccard >= t share a shingle among the first |s| - ceil(t |s|) + 1 of each; only those are indexed.
    index: dict[int, list[int]] = {}
    kept, kept_sets = [], []
    for t, s in zip(texts, sets):
        prefix = sorted(s, key=lambda g: (freq[g], g))[: len(s) - int(np.ceil(max_jaccard * len(s))) + 1]
        cands = {j for g in prefix for j in index.get(g, ())}
        if any(len(s & kept_sets[j]) / len(s | kept_sets[j]) >= max_jaccard for j in cands):
            continue
        for g in prefix:
            index.setdefault(g, []).append(len(kept))
        kept.append(t)
        kept_sets.append(s)
    return kept


def mixed_documents(pieces: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` new documents, each 6-14 paragraphs drawn from across the corpus (`distinct` then drops any that
    resemble another)."""
    paras = [p for t in pieces for p in t.split("\n\n") if len(p) > 40]
    out = []
    for _ in range(n):
        doc, size = [], 0
        while size < 2500 or len(doc) < 6:
            p = paras[rng.randrange(len(paras))]
            doc.append(p)
            size += len(p)
            if len(doc) >= 14:
                break
        out.append("\n\n".join(doc)[:PIECE_CHARS])
    return out


def edit_words(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(max(1, round(rate * len(words)))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(vocab)
        elif op < 0.75 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def reorder(text: str, rng: random.Random) -> str:
    sents = SENTENCE_END.split(text)
    if len(sents) >= 3:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(sents) - 1)
            sents[i], sents[i + 1] = sents[i + 1], sents[i]
        return " ".join(sents)
    words = text.split(" ")
    for _ in range(rng.randint(2, 5)):
        i = rng.randrange(max(1, len(words) - 1))
        words[i:i + 2] = words[i:i + 2][::-1]
    return " ".join(words)


def truncate(text: str) -> str:
    cut = text[: int(len(text) * 0.9)]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def near_copy(text: str, vocab: list[str], rng: random.Random) -> tuple[str, str]:
    """An edited copy of ``text`` and the kinds of edit made (one or two of: edit, reorder, truncate)."""
    kinds = rng.sample(["edit", "reorder", "truncate"], rng.choice([1, 1, 2]))
    out = text
    for k in kinds:
        if k == "edit":
            out = edit_words(out, rng.uniform(0.01, 0.04), vocab, rng)
        elif k == "reorder":
            out = reorder(out, rng)
        else:
            out = truncate(out)
    if out == text:
        out = edit_words(out, 0.01, vocab, rng)
        kinds.append("edit")
    return out, "+".join(sorted(kinds))


@dataclass
class Labelled:
    """The near-duplicate set: document i is ``texts[i]``, of group ``groups[i]`` (its original's number)."""

    texts: list[str]
    groups: list[int]
    kinds: list[str]
    """The edits that made a copy (``edit``, ``reorder``, ``truncate``, joined by ``+``); '' for an original."""
    jaccard: list[float]
    """Exact Jaccard similarity of a copy's word 5-gram set with its original's (1.0 for an original)."""


def labelled_set(extra: int, seed: int = SEED) -> Labelled:
    """Originals and their copies, shuffled."""
    rng = random.Random(seed)
    pieces = corpus_pieces()
    base = pieces + (mixed_documents(pieces, extra, rng) if extra else [])
    base = distinct(base)
    vocab = sorted({w for t in pieces for w in t.split(" ") if w.isalpha()})
    docs = [(t, g, "", 1.0) for g, t in enumerate(base)]
    for g in rng.sample(range(len(base)), int(0.3 * len(base))):
        for _ in range(2 if rng.random() < 0.25 else 1):
            text, kind = near_copy(base[g], vocab, rng)
            a, b = shingle_ids(text), shingle_ids(base[g])
            docs.append((text, g, kind, len(a & b) / len(a | b)))
    rng.shuffle(docs)
    return Labelled(*map(list, zip(*docs)))


def write_parts(texts: list[str], folder: Path, parts: int) -> list[Path]:
    """The set as ``parts`` JSONL files, each line ``{"text", "bench": index}``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{k:02d}.jsonl" for k in range(parts)]
    per = -(-len(texts) // parts)
    for k, p in enumerate(paths):
        with open(p, "w") as f:
            for i in range(k * per, min(len(texts), (k + 1) * per)):
                f.write(json.dumps({"text": texts[i], "bench": i}) + "\n")
    return paths


JACCARD_BINS = (0.0, 0.6, 0.7, 0.8, 1.01)


def score(removed: set[int], lab: Labelled) -> dict:
    """Precision, recall, F1 of a set of removed documents (see the module docstring); recall per edit kind and
    per band of a copy's true Jaccard similarity with its original."""
    size = Counter(lab.groups)
    due = {g: size[g] - 1 for g in size}
    tp = fp = 0
    for i in sorted(removed):
        g = lab.groups[i]
        if due[g] > 0:
            due[g] -= 1
            tp += 1
        else:
            fp += 1
    fn = sum(due.values())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    # A copy counts as found when it or its original was removed (with two copies of one original this can credit
    # a copy whose sibling was the one matched: an approximation, the same for every contender).
    original = {g: i for i, (g, k) in enumerate(zip(lab.groups, lab.kinds)) if not k}
    by_kind: dict[str, list[int]] = {}
    by_jaccard: dict[str, list[int]] = {}
    for i, (g, k, j) in enumerate(zip(lab.groups, lab.kinds, lab.jaccard)):
        if k:
            found = int(i in removed or original[g] in removed)
            band = int(np.searchsorted(JACCARD_BINS, j, side="right")) - 1
            for key, d in ((k, by_kind), (f"{JACCARD_BINS[band]:.1f}-{min(1.0, JACCARD_BINS[band + 1]):.1f}",
                                          by_jaccard)):
                d.setdefault(key, [0, 0])
                d[key][0] += found
                d[key][1] += 1

    def rates(d: dict[str, list[int]]) -> dict[str, str]:
        return {k: f"{a}/{b}" for k, (a, b) in sorted(d.items())}

    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "fp": fp, "fn": fn,
            "found_by_edit": rates(by_kind), "found_by_jaccard": rates(by_jaccard)}


# ------------------------------------------------------------------------------------------------ contenders
def near_dedup_config() -> dict:
    """stemma's near_dedup as a user gets it (word 5-grams, 112 permutations, threshold 0.7, verified; the banding
    derived from those), with the shingles pinned to word 5-grams should the defaults change."""
    cls = get("near_dedup")
    cfg = asdict(cls.config_cls(shingle="word", ngram=5))
    bands, rows = cls.config_cls(**cfg).banding()
    return {**cfg, "bands": bands, "rows": rows}


def run_stemma(paths: list[Path], work: Path, steps: list, shard_bytes: int, language: str | None = "en",
               references: tuple[str, ...] = ()) -> tuple[float, object]:
    """A `Curation` of ``paths`` with ``steps`` on 2 local workers: (wall seconds, the `Curated` result)."""
    opts = IngestOptions(name="bench", language=language, steps=parse_steps(steps, "bench"))
    ex = LocalExecutor(WORKERS)
    t0 = time.perf_counter()
    try:
        cur = Curation(paths, opts, work, executor=ex, shard_bytes=shard_bytes).run(references)
    finally:
        ex.close()
    return time.perf_counter() - t0, cur


def run_step_direct(paths: list[Path], config: dict) -> tuple[float, int]:
    """near_dedup's own work in this one process (reading the JSONL, `signature` per 8 MB of text as the pipeline's
    shards, `decide`), without the pipeline's reading, shard files and passes: (CPU seconds, documents removed)."""
    cls = get("near_dedup")
    step = cls(cls.config_cls(**config), CurateContext(name="bench", language="en"))
    t0 = time.process_time()
    step.setup()
    ids, splits, sigs, shard, size = [], [], [], [], 0

    def flush() -> None:
        ids.append(np.array([d.id for d in shard]))
        splits.append(np.zeros(len(shard), dtype=bool))
        sigs.append(step.signature(shard))
        shard.clear()

    for path in paths:
        with open(path) as f:
            for line in f:
                obj = json.loads(line)
                shard.append(Doc(id=str(obj["bench"]), text=obj["text"], split="train", meta={}))
                size += len(obj["text"])
                if size >= 8 << 20:
                    flush()
                    size = 0
    if shard:
        flush()
    removed = step.decide(ids, splits, iter(sigs), StepStats(step="near_dedup"))
    return time.process_time() - t0, len(removed)


def kept_ids(cur) -> set[int]:
    kept = set()
    for p in (cur.train_path, cur.test_path):
        with open(p) as f:
            kept.update(json.loads(line)["bench"] for line in f)
    return kept


@contextlib.contextmanager
def quiet_stderr(log: Path):
    """datatrove's workers log every stage to stderr: send it (and theirs, inherited) to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def datatrove_banding() -> tuple[int, int]:
    """datatrove's default ``MinhashConfig`` banding: (buckets, hashes per bucket)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    cfg = MinhashConfig(n_grams=5)
    return cfg.num_buckets, cfg.hashes_per_bucket


def run_datatrove(folder: Path, work: Path, bands: int, rows: int) -> tuple[float, set[int]]:
    """datatrove's four MinHash stages chained as its example (examples/minhash_deduplication.py) chains them, on
    word 5-grams and ``bands`` x ``rows``: (wall seconds, kept documents)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows)
    w = str(work)
    t0 = time.perf_counter()
    with quiet_stderr(work.parent / "datatrove.log"):
        s1 = LocalPipelineExecutor([JsonlReader(str(folder)), MinhashDedupSignature(f"{w}/sigs", config=cfg)],
                                   tasks=WORKERS, workers=WORKERS, logging_dir=f"{w}/logs/1")
        # Stage 2 runs one task per bucket (its tasks must be a multiple of the bands), on the same 2 workers.
        s2 = LocalPipelineExecutor([MinhashDedupBuckets(f"{w}/sigs", f"{w}/buckets", config=cfg)],
                                   tasks=bands, workers=WORKERS, logging_dir=f"{w}/logs/2", depends=s1)
        s3 = LocalPipelineExecutor([MinhashDedupCluster(f"{w}/buckets", f"{w}/remove", config=cfg)],
                                   tasks=1, logging_dir=f"{w}/logs/3", depends=s2)
        s4 = LocalPipelineExecutor([JsonlReader(str(folder)), MinhashDedupFilter(f"{w}/remove"),
                                    JsonlWriter(f"{w}/out", compression=None)],
                                   tasks=WORKERS, workers=WORKERS, logging_dir=f"{w}/logs/4", depends=s3)
        s4.run()
    seconds = time.perf_counter() - t0
    kept = set()
    for p in (work / "out").glob("*.jsonl"):
        with open(p) as f:
            kept.update(json.loads(line)["metadata"]["bench"] for line in f)
    return seconds, kept


def run_datasketch(paths: list[Path], bands: int, rows: int, limit: int | None = None
                   ) -> tuple[float, float, set[int], int]:
    """The loop a datasketch user writes; ``limit`` stops after that many documents (the rate is what counts).
    Returns (wall seconds, CPU seconds, removed documents, documents seen)."""
    from datasketch import MinHash, MinHashLSH

    num_perm = bands * rows
    t0, c0 = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    removed, n = set(), 0
    for path in paths:
        with open(path) as f:
            for line in f:
                if limit is not None and n >= limit:
                    break
                obj = json.loads(line)
                m = MinHash(num_perm=num_perm, seed=1)
                for s in shingle_set(obj["text"]):
                    m.update(s.encode("utf-8"))
                if lsh.query(m):
                    removed.add(obj["bench"])
                else:
                    lsh.insert(obj["bench"], m)
                n += 1
    return time.perf_counter() - t0, time.process_time() - c0, removed, n


# ------------------------------------------------------------------------------------------------ Gopher rules
def gopher(peer_rounds: int) -> dict:
    """Keep/drop agreement and speed of the two implementations of Gopher's quality rules, same thresholds."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    texts = [t for t, _ in read_documents([CORPUS], ReadOptions(), [])]
    cls = get("gopher_quality")
    cfg = cls.config_cls()
    ours = cls(cfg, CurateContext(name="bench", language="en"))
    ours.setup()
    theirs = GopherQualityFilter(
        min_doc_words=cfg.min_doc_words, max_doc_words=cfg.max_doc_words, min_avg_word_length=cfg.min_avg_word_length,
        max_avg_word_length=cfg.max_avg_word_length, max_symbol_word_ratio=cfg.max_symbol_word_ratio,
        max_bullet_lines_ratio=cfg.max_bullet_lines_ratio, max_ellipsis_lines_ratio=cfg.max_ellipsis_lines_ratio,
        max_non_alpha_words_ratio=cfg.min_alpha_words_ratio, min_stop_words=cfg.min_stop_words,
        stop_words=list(cfg.stop_words))
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    theirs.filter(docs[0])  # loads spaCy's blank English tokenizer, once, as a worker would
    t_ours, t_theirs = [], []
    for r in range(3):
        # CPU time of this one process: what other load on the machine does not change.
        stats = StepStats(step="gopher_quality")
        t0 = time.process_time()
        a = [ours.apply(Doc(id=str(i), text=t, split="train", meta={}), stats) for i, t in enumerate(texts)]
        t_ours.append(time.process_time() - t0)
        if r < peer_rounds:  # datatrove takes 30 times as long: one round in quick mode
            t0 = time.process_time()
            b = [theirs.filter(d) for d in docs]
            t_theirs.append(time.process_time() - t0)
    ours_drop = [r.reason if isinstance(r, Drop) else None for r in a]
    their_drop = [None if r is True else (r[1] if isinstance(r, tuple) else "dropped") for r in b]
    same = [(x is None) == (y is None) for x, y in zip(ours_drop, their_drop)]
    differ = [{"doc": i, "stemma": ours_drop[i], "datatrove": their_drop[i], "text": texts[i][:80]}
              for i, s in enumerate(same) if not s]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    return {"docs": len(texts), "mb": mb, "agreement": sum(same) / len(same),
            "same_reason": sum(x == y for x, y in zip(ours_drop, their_drop)) / len(same),
            "dropped_stemma": sum(x is not None for x in ours_drop),
            "dropped_datatrove": sum(y is not None for y in their_drop),
            "docs_s": len(texts) / min(t_ours), "datatrove_docs_s": len(texts) / min(t_theirs), "disagreements": differ}


# ------------------------------------------------------------------------------------------------ whole pipeline
TOKEN = regex.compile(r"\w+|[^\w\s]+")


def prose(paragraph: str) -> str | None:
    """A paragraph of the shipped corpus as one line if it reads as prose (at least 8 tokens, 85% of its words and
    punctuation tokens with a letter, a terminal full stop), else None: not an option table or a code listing."""
    line = " ".join(paragraph.split())
    tokens = TOKEN.findall(line)
    if len(tokens) < 8 or not line.endswith((".", "!", "?")):
        return None
    return line if sum(1 for t in tokens if any(c.isalpha() for c in t)) >= 0.85 * len(tokens) else None


def scramble(paragraph: str, rng: random.Random) -> str:
    """Its words in a random order, the first and last kept in place: word statistics and terminal punctuation stay
    as they were, but no long word n-gram survives, so the generated documents neither repeat each other nor
    overlap the test split (no decontamination or deduplication by accident)."""
    w = paragraph.split(" ")
    mid = w[1:-1]
    rng.shuffle(mid)
    return " ".join([w[0], *mid, w[-1]])


def generate_corpus(folder: Path, total_bytes: int, seed: int = SEED + 1) -> int:
    """JSONL files of documents made of 6-20 prose paragraphs drawn from the shipped corpus (so that most pass the
    quality filters and reach every step), their words scrambled, plus 5% exact and 10% edited copies of earlier
    ones. Returns the bytes of text written."""
    rng = random.Random(seed)
    pieces = corpus_pieces()
    paras = [p for p in (prose(p) for t in pieces for p in t.split("\n\n")) if p]
    vocab = sorted({w for t in pieces for w in t.split(" ") if w.isalpha()})
    folder.mkdir(parents=True, exist_ok=True)
    written = part = 0
    recent: list[str] = []
    f = None
    while written < total_bytes:
        if f is None or f.tell() > 64 << 20:
            if f:
                f.close()
            f = open(folder / f"gen-{part:04d}.jsonl", "w")
            part += 1
        r = rng.random()
        if r < 0.05 and recent:
            text = rng.choice(recent)
        elif r < 0.15 and recent:
            text = near_copy(rng.choice(recent), vocab, rng)[0]
        else:
            text = "\n\n".join(scramble(p, rng) for p in rng.choices(paras, k=rng.randint(6, 20)))
            recent.append(text)
            if len(recent) > 500:
                recent.pop(rng.randrange(len(recent)))
        f.write(json.dumps({"text": text}) + "\n")
        written += len(text.encode())
    if f:
        f.close()
    return written


class Monitor:
    """Resident memory and CPU time of a process tree (this process by default), sampled every 0.1 s in a thread.

    Memory: the largest sum of resident sets over the tree (pages shared between processes counted in each: an upper
    bound). CPU: user + system seconds of every process seen, at its last sample (a process's last < 0.1 s is missed),
    minus the root's own before the start; robust to other load on the machine, unlike wall time."""

    def __init__(self, pid: int | None = None, every: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = self.peak_driver = 0
        self.peak_parts: list[tuple[str, int]] = []
        self.cpu: dict[int, float] = {}
        t = self.proc.cpu_times()
        self._cpu0 = t.user + t.system
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        parts = []
        with contextlib.suppress(psutil.Error):
            for p in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error), p.oneshot():
                    rss, t = p.memory_info().rss, p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    parts.append(("driver" if p.pid == self.proc.pid else "worker", rss))
                    if p.pid == self.proc.pid:
                        self.peak_driver = max(self.peak_driver, rss)
        total = sum(r for _, r in parts)
        if total > self.peak:
            self.peak, self.peak_parts = total, parts

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values()) - self._cpu0

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def pipeline(work: Path, total_bytes: int, shard_bytes: int) -> dict:
    """Every registered step over a generated corpus, in a child process whose tree's memory is sampled: this
    process holds the labelled set, datatrove and torch, which a `stemma` run does not."""
    t0 = time.perf_counter()
    generate_corpus(work / "gen", total_bytes)
    gen_s = time.perf_counter() - t0
    ref = work / "references.jsonl"
    ref.write_text("".join(json.dumps({"text": t}) + "\n" for t in random.Random(SEED).sample(corpus_pieces(), 5)))
    import subprocess

    child = subprocess.Popen([sys.executable, __file__, "--pipeline-child", str(work), str(shard_bytes)])
    with Monitor(child.pid) as mon:
        if child.wait():
            raise SystemExit(f"the pipeline run failed (exit status {child.returncode})")
    out = json.loads((work / "result.json").read_text())
    return {**out, "generate_s": gen_s, "peak_rss_bytes": mon.peak, "peak_driver_rss_bytes": mon.peak_driver,
            "cpu_s": mon.cpu_seconds,
            "mb_per_cpu_s": out["mb"] / mon.cpu_seconds,
            "peak_rss_processes": [{"process": k, "rss_bytes": r} for k, r in mon.peak_parts]}


def pipeline_child(work: Path, shard_bytes: int) -> None:
    """Runs in the child: every registered step (those whose packages are missing are left out, and listed)."""
    steps = [s for s in PIPELINE_ORDER if s in names()] + sorted(set(names()) - set(PIPELINE_ORDER))
    skipped = {}
    while True:
        run_dir = work / f"run-{len(skipped)}"
        try:
            seconds, cur = run_stemma(sorted((work / "gen").glob("*.jsonl")), run_dir, steps, shard_bytes,
                                      language=None, references=(str(work / "references.jsonl"),))
            break
        except DataError as e:  # a step whose package is not installed: run the others, say so
            bad = next((s for s in steps if f"the {s} step" in str(e) or f"step {s}" in str(e)), None)
            if bad is None:
                raise
            skipped[bad] = str(e)
            steps.remove(bad)
            shutil.rmtree(run_dir, ignore_errors=True)
    mb = cur.run["mb_read"]
    result = {"steps": steps, "skipped": skipped, "mb": mb, "seconds": seconds, "mb_s": mb / seconds,
              "mb_s_per_core": mb / seconds / WORKERS, "counts": cur.counts, "per_step": cur.run["steps"],
              "removed": {s["step"]: s["removed"] for s in cur.steps}, "shard_bytes": shard_bytes}
    (work / "result.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--pipeline-child":
        return pipeline_child(Path(sys.argv[2]), int(sys.argv[3]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import parser, print_table, write_json

    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="keep the work files in this folder (default: a temporary one)")
    ap.add_argument("--datasketch-docs", type=int, default=None,
                    help="time the datasketch loop on the first N documents only (default: 2000 quick, all full)")
    ap.add_argument("--pipeline-mb", type=int, default=None,
                    help="size of the generated corpus of the whole-pipeline run (default: 16 quick, 2048 full)")
    args = ap.parse_args()
    quick = args.quick
    load0 = os.getloadavg()
    # Quick: about 4,000 documents (the corpus's ~1,400 distinct pieces, 1,500 mixed ones, 30% copied), the datasketch
    # loop timed on the first 2,000 (its rate per document is flat; its F1 is only scored in full mode).
    extra, rounds, ds_docs = (1_500, 1, 2_000) if args.quick else (20_000, 3, None)
    # Quick: 16 MB, not more, to stay within three minutes at the steps' present speed (about 0.25 MB per CPU second).
    pipe_bytes = (args.pipeline_mb << 20) if args.pipeline_mb else (16 << 20) if quick else (2 << 30)
    pipe_shard = (2 << 20) if pipe_bytes <= (64 << 20) else (8 << 20)

    with contextlib.ExitStack() as stack:
        if args.keep:
            root = args.keep
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stemma-curate-bench-")))

        # 1. near-deduplication
        t0 = time.perf_counter()
        lab = labelled_set(extra)
        n = len(lab.texts)
        set_mb = sum(len(t.encode()) for t in lab.texts) / 1e6
        paths = write_parts(lab.texts, root / "set", 4)
        make_s = time.perf_counter() - t0
        nd = near_dedup_config()
        bands, rows = nd["bands"], nd["rows"]
        dt_bands, dt_rows = datatrove_banding()
        # Shards of about an eighth of the set, so that both workers have several: the default (8 MB) would put a
        # set this small in one shard on one worker.
        shard = max(256 << 10, int(set_mb * 1e6) // (4 * WORKERS))
        step = [{"near_dedup": {"shingle": "word", "ngram": 5}}]
        times: dict[str, list[float]] = {"stemma": [], "datatrove": []}
        cpu: dict[str, list[float]] = {"stemma": [], "datatrove": []}
        for r in range(rounds):  # alternating, so drift in the machine's speed hits both
            with Monitor() as mon:
                s, cur = run_stemma(paths, root / f"stemma-nd-{r}", step, shard)
            times["stemma"].append(s)
            cpu["stemma"].append(mon.cpu_seconds)
            with Monitor() as mon:
                s, dt_kept = run_datatrove(root / "set", root / f"datatrove-nd-{r}", dt_bands, dt_rows)
            times["datatrove"].append(s)
            cpu["datatrove"].append(mon.cpu_seconds)
        ours = score(set(range(n)) - kept_ids(cur), lab)
        dt = score(set(range(n)) - dt_kept, lab)
        # The step as datatrove's algorithm exactly: its banding, every bucket collision a duplicate.
        _, cur_nv = run_stemma(paths, root / "stemma-nd-noverify", [{"near_dedup": {
            **step[0]["near_dedup"], "verify": False, "bands": dt_bands, "rows": dt_rows}}], shard)
        unverified = score(set(range(n)) - kept_ids(cur_nv), lab)
        step_cpu, step_removed = run_step_direct(paths, step[0]["near_dedup"])
        ds_s, ds_cpu, ds_removed, ds_n = run_datasketch(paths, bands, rows, args.datasketch_docs or ds_docs)
        ours_s, dt_s = statistics.median(times["stemma"]), statistics.median(times["datatrove"])
        ours_cpu, dt_cpu = statistics.median(cpu["stemma"]), statistics.median(cpu["datatrove"])
        ds_rate, ours_rate = ds_n / ds_s, n / ours_s
        ds = score(ds_removed, lab) if ds_n == n else None

        # 2. Gopher quality rules
        gq = gopher(rounds)

        # 3. the whole pipeline
        pipe = pipeline(root / "pipeline", pipe_bytes, pipe_shard)

    figures = {
        "speedup_vs_datatrove": dt_s / ours_s, "f1": ours["f1"], "datatrove_f1": dt["f1"],
        "speedup_vs_datasketch": ours_rate / ds_rate, "gopher_agreement": gq["agreement"],
        "pipeline_mb_s_per_core": pipe["mb_s_per_core"], "peak_rss_bytes": pipe["peak_rss_bytes"],
        "speedup_vs_datatrove_cpu": dt_cpu / ours_cpu,
        "speedup_vs_datasketch_cpu": (ds_cpu / ds_n) / (ours_cpu / n),
        "speedup_vs_datasketch_step": (ds_cpu / ds_n) / (step_cpu / n),
        "f1_unverified": unverified["f1"], "datasketch_f1": ds["f1"] if ds else None,
        "gopher_docs_s_ratio": gq["docs_s"] / gq["datatrove_docs_s"],
        "near_dedup": {"docs": n, "groups_with_copies": sum(1 for c in Counter(lab.groups).values() if c > 1),
                       "copies": sum(1 for k in lab.kinds if k), "mb": set_mb, "make_s": make_s,
                       "stemma_config": nd, "datatrove_banding": [dt_bands, dt_rows],
                       "shard_bytes": shard, "rounds": rounds, "seconds": times,
                       "cpu_seconds": {**cpu, "datasketch": ds_cpu, "stemma_step_direct": step_cpu},
                       "step_direct_removed": step_removed,
                       "stemma_s": ours_s, "datatrove_s": dt_s, "datasketch_s": ds_s, "datasketch_docs": ds_n,
                       "stemma_docs_s": ours_rate, "datasketch_docs_s": ds_rate, "stemma": ours, "datatrove": dt,
                       "stemma_unverified": unverified, "datasketch": ds, "stemma_run": cur.run},
        "gopher": gq, "pipeline": pipe, "quick": quick, "workers": WORKERS,
        "load_average": {"start": load0, "end": os.getloadavg(), "cores": os.cpu_count()},
        "peers": "datatrove 0.10.1 MinHash pipeline (LocalPipelineExecutor, 2 workers) and GopherQualityFilter; "
                 "datasketch 2.0.0 MinHash + MinHashLSH loop (1 process)",
    }
    f3 = lambda x: f"{x:.3f}"  # noqa: E731
    print_table(
        f"curation: near-dedup of {n:,} docs ({set_mb:.1f} MB, {figures['near_dedup']['copies']:,} labelled copies), "
        f"word 5-grams, stemma {bands} x {rows} verified, datatrove {dt_bands} x {dt_rows}, {WORKERS} workers, "
        f"{rounds} round(s)",
        [("near-dedup seconds: datatrove vs stemma", f"{dt_s:.2f}", f"{ours_s:.2f}", f"{dt_s / ours_s:.2f}x"),
         ("near-dedup CPU seconds (all processes): datatrove vs stemma", f"{dt_cpu:.2f}", f"{ours_cpu:.2f}",
          f"{dt_cpu / ours_cpu:.2f}x"),
         ("near-dedup F1: datatrove vs stemma", f3(dt["f1"]), f3(ours["f1"]), f"{ours['f1'] - dt['f1']:+.3f}"),
         ("  precision / recall", f"{dt['precision']:.3f} / {dt['recall']:.3f}",
          f"{ours['precision']:.3f} / {ours['recall']:.3f}", ""),
         ("  F1, stemma as datatrove (its banding, unverified)", f3(dt["f1"]), f3(unverified["f1"]),
          f"{unverified['f1'] - dt['f1']:+.3f}"),
         (f"near-dedup docs/s: datasketch loop ({ds_n:,} docs) vs stemma", f"{ds_rate:,.0f}", f"{ours_rate:,.0f}",
          f"{ours_rate / ds_rate:.1f}x"),
         ("  docs per CPU second: datasketch vs the step alone (1 process)", f"{ds_n / ds_cpu:,.0f}",
          f"{n / step_cpu:,.0f}", f"{figures['speedup_vs_datasketch_step']:.1f}x"),
         ("  F1: datasketch vs stemma", "-" if ds is None else f3(ds["f1"]), f3(ours["f1"]), ""),
         (f"gopher_quality docs/s ({gq['docs']} docs, 1 process): datatrove vs stemma",
          f"{gq['datatrove_docs_s']:,.0f}", f"{gq['docs_s']:,.0f}", f"{figures['gopher_docs_s_ratio']:.2f}x"),
         ("gopher keep/drop agreement (documents dropped)", f"{gq['dropped_datatrove']}", f"{gq['dropped_stemma']}",
          f"{gq['agreement']:.4f}"),
         (f"pipeline MB/s per core ({pipe['mb']:.0f} MB, {len(pipe['steps'])} steps)", "-",
          f"{pipe['mb_s_per_core']:.2f}", ""),
         ("pipeline MB per CPU second (driver + workers)", "-", f"{pipe['mb_per_cpu_s']:.2f}", ""),
         ("pipeline peak RSS, driver + workers (MB)", "-", f"{pipe['peak_rss_bytes'] / 1e6:,.0f}", "")],
    )
    print(f"found by true Jaccard: datatrove {dt['found_by_jaccard']}, stemma {ours['found_by_jaccard']}, "
          f"stemma unverified {unverified['found_by_jaccard']}")
    print(f"found by edit: datatrove {dt['found_by_edit']}\n               stemma {ours['found_by_edit']}")
    print(f"pipeline steps: {', '.join(pipe['steps'])}"
          + (f" (left out: {', '.join(pipe['skipped'])})" if pipe["skipped"] else "")
          + f"; kept {pipe['counts']['documents']:,} of {pipe['counts']['documents_read']:,} documents")
    print("  per step MB/s: " + ", ".join(f"{s['step']} {s['mb_s']}" for s in pipe["per_step"]))
    load1 = os.getloadavg()
    if max(load0[0], load1[0]) > (os.cpu_count() or 1):
        print(f"note: the machine was busy (load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end, "
              f"{os.cpu_count()} cores): wall times are inflated, the CPU-time figures are the steadier ones")
    print("targets: speedup_vs_datatrove >= 3, f1 >= datatrove_f1, speedup_vs_datasketch >= 10, "
          "gopher_agreement >= 0.99, peak RSS < 1 GB on the full 2 GB run")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
