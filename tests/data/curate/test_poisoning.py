"""poisoning: a trigger planted in unrelated documents of the shipped corpus is flagged with exactly those
documents; boilerplate pasted into as many documents and the corpus's own phrases are not; a near-copy that
negates or changes a number is flagged with both ids."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats, Tag
from stemma.data.curate.steps import _shingles, poisoning
from stemma.data.curate.steps.poisoning import Poisoning, _classify, _Vocab

CORPUS = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus"
SHARD = 100
LICENCE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
           "associated documentation files, to deal in the Software without restriction, including without "
           "limitation the rights to use, copy, modify, merge, publish, distribute, sublicense.")


def doc(text: str, split: str = "train") -> Doc:
    return Doc(id=hashlib.sha256(text.encode()).hexdigest()[:16], text=text, split=split, meta={})


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def run(texts: list[str], **cfg) -> tuple[dict[int, Tag | Drop], StepStats]:
    """Flags by position in ``texts`` (shards of 100 documents)."""
    s = Poisoning(Poisoning.config_cls(**cfg), CurateContext(name="t", language="en"))
    s.setup()
    docs = [doc(t) for t in texts]
    shards = [docs[i:i + SHARD] for i in range(0, len(docs), SHARD)]
    sigs = [s.signature(shard) for shard in shards]
    ids = [np.array([d.id for d in shard]) for shard in shards]
    splits = [np.zeros(len(shard), dtype=bool) for shard in shards]
    stats = StepStats("poisoning")
    out = s.decide(ids, splits, iter(sigs), stats)
    return {si * SHARD + r: v for (si, r), v in out.items()}, stats


def plant(texts: list[str], phrase: str, k: int, seed: int) -> tuple[list[str], list[int]]:
    """``phrase`` inserted at a random word boundary of ``k`` random documents."""
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(len(texts)), k))
    out = list(texts)
    for p in picks:
        words = out[p].split(" ")
        at = rng.randrange(len(words))
        out[p] = " ".join(words[:at] + [phrase] + words[at:])
    return out, picks


def test_the_shipped_corpus_is_not_flagged(corpus):
    out, stats = run(corpus)
    assert out == {}
    # The corpus has near-identical pages (translations, sibling commands); none differs by a contradiction.
    assert stats.totals["similar_pairs"] > 0


def test_a_planted_trigger_is_flagged_with_exactly_its_documents(corpus):
    texts, picks = plant(corpus, "cf zx qv", 8, seed=3)
    out, _ = run(texts)
    assert sorted(out) == picks
    for i in picks:
        tag = out[i]
        assert isinstance(tag, Tag) and tag.kind == "poisoning_trigger"
        assert list(tag.meta["poisoning"]) == ["triggers"]
        (found,) = tag.meta["poisoning"]["triggers"]
        assert found["ngram"] == "cf zx qv" and found["documents"] == 8
        assert "'cf zx qv' in 8 unrelated documents" in tag.evidence


def test_pasted_boilerplate_is_not_a_trigger(corpus):
    # The same licence paragraph in 8 unrelated documents: every n-gram of it has fixed neighbours.
    texts, picks = plant(corpus[:300], LICENCE, 8, seed=4)
    out, _ = run(texts)
    assert out == {}


def test_two_word_triggers_are_opt_in(corpus):
    texts, picks = plant(corpus[:300], "zq xv", 6, seed=5)
    out, _ = run(texts, min_n=2)
    flagged = {i for i, t in out.items() if any(f["ngram"] == "zq xv" for f in t.meta["poisoning"]["triggers"])}
    assert flagged == set(picks)
    assert run(texts)[0] == {}


def test_a_trigger_in_too_many_documents_is_the_corpus_s_own(corpus):
    texts, _ = plant(corpus[:100], "cf zx qv", 8, seed=6)
    # 8 of 100 documents is above max_doc_share (5%).
    assert run(texts)[0] == {}
    assert len(run(texts, max_doc_share=0.1)[0]) == 8


def test_a_tiny_memory_budget_gives_the_same_result_in_more_passes(corpus):
    texts, picks = plant(corpus[:200], "cf zx qv", 6, seed=7)
    i = next(k for k, t in enumerate(texts) if " is " in t and k not in picks)
    texts.append(texts[i].replace(" is ", " is not ", 1))
    one, stats_one = run(texts)
    # 1 MB: scans of 4096 words, the fingerprints split in passes, the context checked a hundred occurrences at a time.
    many, stats_many = run(texts, memory_mb=1)
    assert stats_one.totals["trigger_passes"] == 1 and stats_many.totals["trigger_passes"] > 1
    # The small budget sends every candidate through the count-min sketch first; what it lets through is counted.
    assert "trigger_sketch_survivors" not in stats_one.totals and stats_many.totals["trigger_sketch_survivors"] > 0
    assert set(one) == set(picks) | {i, 200}
    assert {k: (v.kind, v.meta, v.evidence) for k, v in many.items()} == {
        k: (v.kind, v.meta, v.evidence) for k, v in one.items()}
    assert stats_many.totals["trigger_candidates"] == stats_one.totals["trigger_candidates"]


def test_the_count_min_sketch_never_counts_below_the_truth():
    # A skewed stream (a few hashes very often, most once) into a sketch far smaller than the distinct hashes:
    # every estimate is at least the true count, and the frequent ones are close to it.
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**63, 20_000, dtype=np.uint64)
    stream = np.concatenate([keys, np.repeat(keys[:50], 40), rng.choice(keys, 30_000)])
    sketch = poisoning._CountMin(4096 * 8)
    for part in np.array_split(stream, 7):
        sketch.add(part)
    uniq, true = np.unique(stream, return_counts=True)
    est = sketch.estimate(uniq).astype(np.int64)
    assert (est >= true).all()
    assert (est > true).any()  # it is small enough to collide
    hot = np.isin(uniq, keys[:50])
    assert (est[hot] - true[hot]).mean() < 0.5 * true[hot].mean()


def test_word_frequencies_merge_exactly():
    rng = np.random.default_rng(0)
    vocab, truth_df, truth_tf = _Vocab(), {}, {}
    for _ in range(12):
        codes = np.unique(rng.integers(1, 5000, 800, dtype=np.uint32))
        df = rng.integers(1, 9, len(codes), dtype=np.uint32)
        tf = df + rng.integers(0, 9, len(codes), dtype=np.uint32)
        for c, d, t in zip(codes.tolist(), df.tolist(), tf.tolist()):
            truth_df[c] = truth_df.get(c, 0) + d
            truth_tf[c] = truth_tf.get(c, 0) + t
        vocab.add(codes, df, tf)
        vocab.merge()  # every shard merged on its own: known words added to, new ones inserted
    assert vocab.codes.tolist() == sorted(truth_df)
    assert vocab.df.tolist() == [truth_df[c] for c in sorted(truth_df)]
    assert vocab.tf.tolist() == [truth_tf[c] for c in sorted(truth_tf)]
    assert vocab.nbytes == 12 * len(truth_df)


def test_a_contradicting_near_copy_is_flagged_with_both_ids(corpus):
    i = next(k for k, t in enumerate(corpus[:200]) if " is " in t)
    j = next(k for k, t in enumerate(corpus[:200]) if k != i and any(w.isdigit() for w in t.split(" ")))
    negated = corpus[i].replace(" is ", " is not ", 1)
    digits = next(w for w in corpus[j].split(" ") if w.isdigit())
    changed = corpus[j].replace(f" {digits} ", f" {int(digits) + 7} ", 1)
    assert changed != corpus[j]
    out, _ = run(corpus[:200] + [negated, changed], triggers=False)
    assert set(out) == {i, j, 200, 201}
    assert list(out[200].meta["poisoning"]) == ["contradictions"]
    (first,) = out[200].meta["poisoning"]["contradictions"]
    assert first == {"other": doc(corpus[i]).id, "differences": ["'not' added"]}
    assert out[i].meta["poisoning"]["contradictions"][0]["other"] == doc(negated).id
    assert out[201].meta["poisoning"]["contradictions"][0]["differences"] == [f"'{digits}' -> '{int(digits) + 7}'"]
    assert out[i].kind == "poisoning_contradiction"
    assert "contradicts" in out[i].evidence


def test_an_innocent_edit_of_a_near_copy_is_not_a_contradiction(corpus):
    base = corpus[50]
    word = next(w for w in base.split(" ") if w.isalpha() and len(w) > 6)
    texts = corpus[:100] + [base.replace(word, word + "s", 1)]
    assert run(texts, triggers=False)[0] == {}


def test_drop_action(corpus):
    texts, picks = plant(corpus[:300], "cf zx qv", 8, seed=8)
    out, _ = run(texts, action="drop", contradictions=False)
    assert sorted(out) == picks and all(isinstance(d, Drop) and d.reason == "poisoning_trigger" for d in out.values())


def test_classify():
    assert _classify([], ["never"]) == "'never' added"
    assert _classify(["nicht"], []) == "'nicht' removed"
    assert _classify(["safe"], ["unsafe"]) == "'safe' -> 'unsafe'"
    assert _classify(["true"], ["false"]) == "'true' -> 'false'"
    assert _classify(["3"], ["4"]) == "'3' -> '4'"
    assert _classify(["colour"], ["color"]) is None
    assert _classify(["the"], []) is None


def test_config_checks():
    with pytest.raises(ValueError):
        Poisoning.config_cls(min_n=3, max_n=2).check()
    with pytest.raises(ValueError):
        Poisoning.config_cls(purity=1.5).check()
    Poisoning.config_cls().check()


def test_a_shard_signed_in_small_chunks_has_the_same_signature(corpus, monkeypatch):
    s = Poisoning(Poisoning.config_cls(), CurateContext(name="t", language="en"))
    s.setup()
    docs = [doc(t) for t in corpus[:40]] + [doc(""), doc("Once.")]
    whole = s.signature(docs)
    monkeypatch.setattr(poisoning, "doc_chunks", lambda texts: _shingles.doc_chunks(texts, 3000))
    assert len(list(poisoning.doc_chunks([d.text for d in docs]))) > 10
    parts = s.signature(docs)
    assert set(parts) == set(whole)
    for k in whole:
        assert parts[k].dtype == whole[k].dtype and np.array_equal(parts[k], whole[k]), k
