"""near_dedup: MinHash LSH clusters keep one document (a test one first), drop the others, and drop training
documents near an evaluation reference; unrelated and partly overlapping documents are left alone."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats
from stemma.data.curate.steps import _shingles, near_dedup
from stemma.data.curate.steps.near_dedup import NearDedup

CORPUS = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus"


def shipped(name: str, n: int | None = None) -> list[str]:
    with open(CORPUS / name, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:n] if n else texts


def doc(text: str, split: str = "train") -> Doc:
    return Doc(id=hashlib.sha256(text.encode()).hexdigest()[:16], text=text, split=split, meta={})


def edit(text: str, rate: float, seed: int) -> str:
    """``text`` with ``rate`` of its words replaced by made-up words (each breaks up to 5 word 5-grams)."""
    rng = random.Random(seed)
    spans = [m.span() for m in re.finditer(r"\w+", text)]
    out, last = [], 0
    for s, e in sorted(rng.sample(spans, max(1, int(rate * len(spans))))):
        out += [text[last:s], f"w{rng.randrange(10**6)}"]
        last = e
    return "".join(out) + text[last:]


def step(refs: tuple[str, ...] = (), **cfg) -> NearDedup:
    s = NearDedup(NearDedup.config_cls(**cfg), CurateContext(name="t", language="en", references=refs))
    s.setup()
    return s


def run(s: NearDedup, shards: list[list[Doc]]) -> tuple[dict, StepStats]:
    sigs = [s.signature(shard) for shard in shards]
    ids = [np.array([d.id for d in shard]) for shard in shards]
    splits = [np.array([d.split == "test" for d in shard], dtype=bool) for shard in shards]
    stats = StepStats("near_dedup")
    return s.decide(ids, splits, iter(sigs), stats), stats


def jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t: str) -> set:
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return shipped("en-manpages.jsonl", 60)


def test_near_copies_keep_the_first_and_leave_the_rest(texts):
    a, b, c = texts[10], texts[11], texts[12]
    a2 = edit(a, 0.02, 1)
    a3 = edit(a, 0.015, 2)
    # Shares one paragraph with c: related, not a near-duplicate.
    partial = "\n".join(c.split("\n")[: len(c.split("\n")) // 4]) + "\n" + texts[13]
    shards = [[doc(a), doc(b), doc("")], [doc(a2), doc(c), doc("tiny doc")], [doc(partial), doc(a3)]]
    out, stats = run(step(), shards)
    assert set(out) == {(1, 0), (2, 1)}
    assert out[(1, 0)].reason == "near_duplicate" and out[(1, 0)].evidence.startswith(doc(a).id)
    assert out[(2, 1)].reason == "near_duplicate" and out[(2, 1)].evidence.startswith(doc(a).id)
    assert "Jaccard" in out[(1, 0)].evidence
    assert stats.totals["clusters"] == 1


def test_a_test_copy_is_kept_and_its_training_copies_are_leakage(texts):
    a = texts[20]
    shards = [[doc(a), doc(texts[21])], [doc(edit(a, 0.02, 3), "test"), doc(edit(a, 0.02, 4), "test")]]
    out, _ = run(step(), shards)
    assert set(out) == {(0, 0), (1, 1)}
    assert out[(0, 0)].reason == "near_duplicate_of_test"
    assert out[(0, 0)].evidence.startswith(shards[1][0].id)
    # A second test copy is an ordinary near-duplicate of the first.
    assert out[(1, 1)].reason == "near_duplicate"


def test_training_documents_near_a_reference_are_leakage(tmp_path, texts):
    ref = tmp_path / "eval.jsonl"
    with open(ref, "w") as f:
        f.write(json.dumps({"text": texts[30]}) + "\n\n")
        f.write(json.dumps({"text": "an unrelated evaluation question about nothing in the corpus"}) + "\n")
    shards = [[doc(edit(texts[30], 0.02, 5)), doc(texts[31])], [doc(edit(texts[30], 0.03, 6), "test")]]
    out, _ = run(step(refs=(str(ref),)), shards)
    # The test copy stays (evaluation data itself); the training copy leaks the reference.
    assert set(out) == {(0, 0)}
    assert out[(0, 0)].reason == "leakage"
    assert out[(0, 0)].evidence.startswith("eval.jsonl:1: ")


def test_near_duplicate_references_alone_change_nothing(tmp_path, texts):
    ref = tmp_path / "eval.jsonl"
    ref.write_text("".join(json.dumps({"text": t}) + "\n" for t in (texts[35], edit(texts[35], 0.01, 7))))
    out, _ = run(step(refs=(str(ref),)), [[doc(texts[36]), doc(texts[37])]])
    assert out == {}


def test_what_is_dropped_in_real_man_pages_is_a_genuine_near_duplicate(texts):
    # Of the first 60 pages, one pair passes the threshold: base32(1) and base64(1) (Jaccard 0.71; the next most
    # similar pair is at 0.41). Exactly the later one goes.
    assert [(i, j) for i in range(60) for j in range(i + 1, 60) if jaccard(texts[i], texts[j]) >= 0.7] == [(16, 17)]
    out, _ = run(step(), [[doc(t) for t in texts[:30]], [doc(t) for t in texts[30:]]])
    assert list(out) == [(0, 17)] and out[(0, 17)].evidence.startswith(doc(texts[16]).id)
    # All English pages have a few (sibling commands documented together); each is checked exactly.
    pages = shipped("en-manpages.jsonl")
    out, _ = run(step(), [[doc(t) for t in pages[k:k + 100]] for k in range(0, len(pages), 100)])
    assert len(out) >= 3
    by_id = {doc(t).id: t for t in pages}
    for (s, r), d in out.items():
        assert isinstance(d, Drop) and d.reason == "near_duplicate"
        assert jaccard(pages[s * 100 + r], by_id[d.evidence.split(" ")[0]]) >= 0.6


def test_shipped_corpus_planted_copies_all_found():
    texts = shipped("en-python.jsonl") + shipped("de-manpages.jsonl", 60)
    rng = random.Random(0)
    planted = rng.sample(range(len(texts)), 15)
    copies = [edit(texts[i], 0.005 + 0.005 * (k % 4), 100 + k) for k, i in enumerate(planted)]
    docs = [doc(t) for t in texts + copies]
    shards = [docs[i:i + 40] for i in range(0, len(docs), 40)]
    out, _ = run(step(), shards)
    found = {s * 40 + r for (s, r) in out}
    assert set(range(len(texts), len(texts) + 15)) <= found


def test_char_shingles_for_text_without_spaces():
    rng = random.Random(1)
    alphabet = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生"
    base = "".join(rng.choice(alphabet) for _ in range(400))
    near = base[:200] + "了" + base[201:]
    other = "".join(rng.choice(alphabet) for _ in range(400))
    out, _ = run(step(shingle="char", ngram=5), [[doc(base), doc(other), doc(near)]])
    assert set(out) == {(0, 2)}
    # With word shingles the whole text is one word: the near copy is a different single shingle.
    out, _ = run(step(), [[doc(base), doc(other), doc(near)]])
    assert out == {}


def test_signatures_are_deterministic_and_independent_of_the_shard(texts):
    s = step()
    one = s.signature([doc(texts[0]), doc(texts[1])])
    two = step().signature([doc(texts[5]), doc(texts[1])])
    assert one["bands"].dtype == np.uint64 and one["sig"].dtype == np.uint16
    assert np.array_equal(one["bands"][1], two["bands"][1])
    assert not np.array_equal(one["bands"][0], two["bands"][0])
    # No object arrays: the pipeline stores signatures as .npz.
    assert all(a.dtype != object for a in one.values())


def test_without_verification_only_band_hashes_are_kept(texts):
    s = step(verify=False)
    sig = s.signature([doc(texts[0])])
    assert set(sig) == {"bands", "valid"}
    out, _ = run(s, [[doc(texts[40]), doc(edit(texts[40], 0.02, 9))]])
    assert set(out) == {(0, 1)} and "bands shared" in out[(0, 1)].evidence


def test_config_checks():
    cfg = NearDedup.config_cls
    with pytest.raises(ValueError, match="num_perm"):
        cfg(bands=20, rows=8).check()
    with pytest.raises(ValueError, match="threshold"):
        cfg(threshold=0.3, bands=14, rows=8).check()  # 14 x 8 selects around 0.72
    with pytest.raises(ValueError, match="both"):
        cfg(rows=8).check()
    with pytest.raises(ValueError, match="verify_margin"):
        cfg(verify_margin=-1).check()
    cfg(bands=None, rows=None, threshold=0.5).check()
    cfg(threshold=0.3).check()  # the derived banding follows the threshold
    # Verified candidates: a miss weighs nine times a false candidate; unverified, both weigh the same.
    assert cfg().banding() == _shingles.optimal_bands(0.7, 112, 0.9) == (18, 6)
    assert cfg(verify=False).banding() == _shingles.optimal_bands(0.7, 112) == (12, 9)


def test_optimal_bands_follow_the_threshold():
    lo_b, lo_r = _shingles.optimal_bands(0.5, 128)
    hi_b, hi_r = _shingles.optimal_bands(0.9, 128)
    assert lo_b * lo_r <= 128 and hi_b * hi_r <= 128
    # The S-curve's knee (1/b)**(1/r) moves with the threshold.
    assert (1 / lo_b) ** (1 / lo_r) < (1 / hi_b) ** (1 / hi_r)


def test_components_join_chains():
    labels = _shingles.components(6, np.array([0, 4, 2]), np.array([4, 5, 3]))
    assert labels.tolist() == [0, 1, 2, 2, 0, 0]


def synthetic(agree: list[int], num_perm: int = 112, bands: int = 18) -> dict[str, np.ndarray]:
    """Signatures of a first document and one more per entry of ``agree``, every one sharing the first's buckets
    (so all are candidates of it) and agreeing with it on exactly that many of the ``num_perm`` values."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1 << 16, num_perm, dtype=np.uint16)
    rows = [base]
    for k in agree:
        other = base.copy()
        other[k:] ^= np.uint16(1)  # differs in every value from k on
        rows.append(other)
    n = len(rows)
    return {"bands": np.tile(np.arange(bands, dtype=np.uint64), (n, 1)), "valid": np.ones(n, dtype=bool),
            "sig": np.stack(rows)}


def test_verification_rejects_only_pairs_clearly_below_the_threshold():
    s = step()
    cut = s.config.reject_below()
    assert cut == pytest.approx(0.7 - 2 * (0.7 * 0.3 / 112) ** 0.5) and 0.613 < cut < 0.614
    # 70/112 = 0.625: below the threshold but within the estimate's noise of it, so joined; 63/112 = 0.5625 and
    # 30/112 are clearly below it (a bucket shared by chance), so rejected.
    sig = synthetic([70, 63, 30])
    ids = [np.array(["a", "b", "c", "d"])]
    splits = [np.zeros(4, dtype=bool)]
    stats = StepStats("near_dedup")
    out = s.decide(ids, splits, iter([sig]), stats)
    assert set(out) == {(0, 1)} and out[(0, 1)].evidence == "a (Jaccard ~ 0.62)"
    assert stats.totals["candidate_pairs"] == 3 and stats.totals["similar_pairs"] == 1
    # A margin of 0 rejects every estimate below the threshold; one of 5 (0.483) joins 0.5625 too, not 30/112.
    assert step(verify_margin=0).decide(ids, splits, iter([sig]), StepStats("near_dedup")) == {}
    assert set(step(verify_margin=5).decide(ids, splits, iter([sig]), StepStats("near_dedup"))) == {(0, 1), (0, 2)}


def test_a_shard_signed_in_small_chunks_has_the_same_signature(texts, monkeypatch):
    s = step()
    docs = [doc(t) for t in texts[:30]] + [doc("")]
    whole = s.signature(docs)
    monkeypatch.setattr(near_dedup, "doc_chunks", lambda t: _shingles.doc_chunks(t, 5000))
    parts = s.signature(docs)
    for k in whole:
        assert parts[k].dtype == whole[k].dtype and np.array_equal(parts[k], whole[k]), k


def test_a_banding_far_from_the_threshold_is_refused_with_the_derived_one():
    cfg = NearDedup.config_cls
    b, r = cfg(threshold=0.3, num_perm=64, verify=False).banding()
    with pytest.raises(ValueError, match=f"for it: bands {b}, rows {r}, or leave both unset"):
        cfg(threshold=0.3, num_perm=64, verify=False, bands=8, rows=8, shingle="char", ngram=3).check()
