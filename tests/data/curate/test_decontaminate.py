"""decontaminate: training documents sharing a 13-gram (lowercase, punctuation stripped) with a reference file
or with a test document of the corpus are dropped or tagged; 12 shared words, test documents and unrelated
training documents are left alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats, Tag
from stemma.data.curate.steps import _shingles, decontaminate
from stemma.data.curate.steps.decontaminate import Decontaminate

CORPUS = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus"
PASSAGE = ("The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree near the "
           "river bank")
FILLER = [
    "Alpine meadows bloom briefly each summer, and shepherds move their flocks higher as the snow retreats.",
    "A compiler translates source code into machine instructions, checking types and optimising loops.",
    "Tidal power stations convert the rise and fall of the sea into electricity twice a day.",
    "Bakers rest bread dough so that gluten relaxes and the loaf rises evenly in the oven.",
]


def doc(text: str, split: str = "train") -> Doc:
    return Doc(id=hashlib.sha256(text.encode()).hexdigest()[:16], text=text, split=split, meta={})


def write_refs(path, texts: list[str]) -> str:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "task": "x"}) + "\n")
    return str(path)


def run(shards: list[list[Doc]], refs: tuple[str, ...] = (), **cfg) -> tuple[dict, StepStats]:
    s = Decontaminate(Decontaminate.config_cls(**cfg), CurateContext(name="t", language="en", references=refs))
    s.setup()
    sigs = [s.signature(shard) for shard in shards]
    # decide runs in the driver, on a step of its own (no setup there).
    d = Decontaminate(Decontaminate.config_cls(**cfg), CurateContext(name="t", language="en", references=refs))
    ids = [np.array([x.id for x in shard]) for shard in shards]
    splits = [np.array([x.split == "test" for x in shard], dtype=bool) for shard in shards]
    stats = StepStats("decontaminate")
    return d.decide(ids, splits, iter(sigs), stats), stats


def words(text: str, k: int) -> str:
    return " ".join(text.split()[:k])


def test_a_shared_13_gram_with_a_reference_drops_the_training_document(tmp_path):
    ref = write_refs(tmp_path / "eval.jsonl", [FILLER[0], "Question: " + PASSAGE + "? Answer: yes."])
    shards = [
        # 13 words of the passage, in another case and punctuation: still the same 13-gram.
        [doc(FILLER[1] + " THE QUICK, brown fox -- jumps over the lazy dog; while the farmer sleeps! " + FILLER[2]),
         # 12 words only: below n.
         doc(FILLER[3] + " " + words(PASSAGE, 12) + " and then something else entirely"),
         doc(FILLER[2])],
        # A test document with the passage is evaluation data itself: kept.
        [doc(PASSAGE, "test"), doc(FILLER[3] + " " + FILLER[1])],
    ]
    out, _ = run(shards, (ref,))
    assert set(out) == {(0, 0)}
    d = out[(0, 0)]
    assert isinstance(d, Drop) and d.reason == "contamination"
    assert "'the quick brown fox jumps over the lazy dog while the farmer sleeps' (eval.jsonl:2)" in d.evidence


def test_a_training_document_overlapping_a_test_document_of_the_corpus_is_contaminated():
    test_doc = doc(FILLER[0] + " " + PASSAGE, "test")
    shards = [
        [doc(FILLER[1] + " " + words(PASSAGE, 14)), doc(FILLER[2])],
        [test_doc],
        [doc(FILLER[3]), doc("intro: " + PASSAGE.upper())],
    ]
    out, stats = run(shards)
    assert set(out) == {(0, 0), (2, 1)}
    assert f"(test document {test_doc.id})" in out[(0, 0)].evidence
    assert out[(0, 0)].evidence.startswith("2 shared 13-gram(s), e.g. 'the quick brown fox")
    assert stats.totals["evaluation_ngrams"] == 16 + 22 - 12  # the test document's 13-grams


def test_min_overlap_counts_distinct_shared_ngrams_from_both_sources(tmp_path):
    ref = write_refs(tmp_path / "r.jsonl", [PASSAGE])
    other = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    shards = [
        [doc(words(PASSAGE, 13) + " " + FILLER[0]),  # 1 n-gram
         doc(words(PASSAGE, 14) + " " + FILLER[1]),  # 2 n-grams
         doc(words(PASSAGE, 13) + " " + FILLER[2] + " " + other)],  # 1 from the reference + 2 from the test doc
        [doc(other + " is a test sentence", "test")],
    ]
    out, _ = run(shards, (ref,), min_overlap=2)
    assert set(out) == {(0, 1), (0, 2)}
    assert out[(0, 2)].evidence.startswith("3 shared")


def test_tag_keeps_the_document_with_the_evidence(tmp_path):
    ref = write_refs(tmp_path / "r.jsonl", [PASSAGE])
    out, _ = run([[doc(PASSAGE + " and more"), doc(FILLER[0])]], (ref,), action="tag")
    assert set(out) == {(0, 0)}
    tag = out[(0, 0)]
    assert isinstance(tag, Tag) and tag.kind == "contaminated"
    assert tag.meta["contamination"]["ngrams"] == 10  # a 22-word passage has 10 13-grams
    assert tag.meta["contamination"]["evidence"].startswith("'the quick brown fox")


def test_nothing_to_compare_against_leaves_everything():
    out, _ = run([[doc(t) for t in FILLER], [doc(PASSAGE)]])
    assert out == {}


def test_short_documents_and_empty_shards():
    out, _ = run([[], [doc(""), doc("tiny", "test")], [doc("tiny")]])
    assert out == {}


def test_common_shared_ngrams_are_boilerplate_not_leaks():
    # The same licence sentence in a test document and in 12 training documents (more than max_train_docs).
    licence = "this program is free software you can redistribute it and or modify it under the same terms"
    test = doc("Exam text follows. " + licence + ". End of the exam.", "test")
    train = [doc(f"page {k}: {FILLER[k % 4]} {licence}") for k in range(12)]
    leak = doc(FILLER[1] + " " + PASSAGE)
    out, stats = run([[test, doc(PASSAGE + " more words", "test")], train + [leak]])
    assert set(out) == {(1, 12)}
    assert stats.totals["common_ngrams_ignored"] == 5
    out, _ = run([[test], train], max_train_docs=12)
    assert set(out) == {(1, k) for k in range(12)}


def test_a_tiny_memory_budget_gives_the_same_result_in_more_passes(tmp_path):
    # Man pages: every fourth a test document, a few training documents quoting 20 words of one or of a reference.
    with open(CORPUS / "en-manpages.jsonl", encoding="utf-8") as f:
        pages = [json.loads(line)["text"] for line in f][:160]
    ref = write_refs(tmp_path / "eval.jsonl", pages[150:155])
    docs = [doc(t, "test" if k % 4 == 0 else "train") for k, t in enumerate(pages[:150])]
    for k, src in enumerate((pages[8], pages[40], pages[151], pages[153])):
        quote = " ".join(src.split()[100:120])
        docs[4 * k + 1] = doc(FILLER[k] + " " + quote + " " + FILLER[(k + 1) % 4])
    shards = [docs[i:i + 50] for i in range(0, len(docs), 50)]
    one, stats_one = run(shards, (ref,))
    many, stats_many = run(shards, (ref,), memory_mb=1)
    assert stats_one.totals["passes"] == 1 and stats_many.totals["passes"] > 1
    assert stats_many.totals["evaluation_ngrams"] == stats_one.totals["evaluation_ngrams"] > 20_000
    # Man pages share sections too (in at most 10 training documents): more are contaminated than the planted.
    assert {(0, 1), (0, 5), (0, 9), (0, 13)} <= set(one)
    assert {k: v.evidence for k, v in many.items()} == {k: v.evidence for k, v in one.items()}
    assert "(eval.jsonl:2)" in one[(0, 9)].evidence and "(test document " in one[(0, 1)].evidence


def test_signature_has_no_object_arrays(tmp_path):
    s = Decontaminate(Decontaminate.config_cls(), CurateContext(name="t"))
    sig = s.signature([doc(PASSAGE), doc(FILLER[0], "test")])
    assert all(a.dtype != object for a in sig.values())
    assert len(sig["train_hash"]) == 10 and len(sig["test_hash"]) == 4
    np.savez(tmp_path / "sig.npz", **sig)
    with np.load(tmp_path / "sig.npz", allow_pickle=False) as z:
        assert bytes(z["test_text"]).decode().startswith("alpine meadows bloom")


def test_config_checks():
    with pytest.raises(ValueError):
        Decontaminate.config_cls(n=0).check()
    with pytest.raises(ValueError):
        Decontaminate.config_cls(min_overlap=0).check()


def test_a_shard_signed_in_small_chunks_has_the_same_signature(monkeypatch):
    s = Decontaminate(Decontaminate.config_cls(), CurateContext(name="t"))
    docs = [doc(f"{FILLER[k % 4]} {PASSAGE} {k}", "test" if k % 3 == 0 else "train") for k in range(30)]
    whole = s.signature(docs)
    monkeypatch.setattr(decontaminate, "doc_chunks", lambda texts: _shingles.doc_chunks(texts, 500))
    parts = s.signature(docs)
    for k in whole:
        assert parts[k].dtype == whole[k].dtype and np.array_equal(parts[k], whole[k]), k
