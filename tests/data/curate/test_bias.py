"""The bias step: exact cue counts on crafted sentences, the offensive score, thresholds, the language gate."""

import json
from pathlib import Path

import numpy as np
import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats
from stemma.data.curate.steps.bias import CATEGORIES, LEXICONS, Bias, BiasConfig, _OffensiveScorer, read_lexicon

NEUTRAL = ("The read() system call attempts to read up to count bytes from file descriptor fd into the buffer "
           "starting at buf. On files that support seeking, the read operation commences at the file offset, and "
           "the file offset is incremented by the number of bytes read. If the file offset is at or past the end "
           "of file, no bytes are read, and read() returns zero.")
INSULT = "You are a worthless stupid idiot and everyone hates you."


def _doc(text: str, meta: dict | None = None) -> Doc:
    return Doc(id="0123456789abcdef", text=text, split="train", meta=dict(meta or {}))


@pytest.fixture(scope="module")
def step() -> Bias:
    s = Bias(BiasConfig(), CurateContext(name="t", language="en"))
    s.setup()
    return s


def test_lexicon_files_are_complete_and_documented():
    sizes = {"hedge": 100, "factive": 27, "assertive": 66, "implicative": 32, "report": 181, "subjective": 4747}
    for cat, (file, _) in CATEGORIES.items():
        path = LEXICONS / file
        head = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
        assert any("Licence" in line for line in head) and any("reproduction" in line for line in head), file
        entries = read_lexicon(path)
        assert len(entries) == sizes[cat] == len({e for e, _ in entries}), file
    assert ("realize", False) in read_lexicon(LEXICONS / CATEGORIES["factive"][0])
    assert ("abuse", True) in read_lexicon(LEXICONS / CATEGORIES["subjective"][0])  # stemmed in the MPQA release


def test_hedge_and_factive_counted_exactly(step):
    stats = StepStats(step="bias")
    doc = step.apply(_doc("It is possible that he realized the truth."), stats)
    assert isinstance(doc, Doc)
    b = doc.meta["bias"]
    assert b["words"] == 8
    # possible: hedge; realized: factive (inflected realize) and report verb (realize); truth: none of them.
    assert (b["hedge"], b["factive"], b["report"], b["assertive"], b["implicative"]) == (12.5, 12.5, 12.5, 0, 0)
    assert stats.totals["words"] == 8 and stats.totals["hedge"] == 1 and stats.totals["factive"] == 1


def test_phrases_count_once_and_inflect_their_verb(step):
    stats = StepStats(step="bias")
    # "pointed out": assertive and report verb (one cue each, not two for "pointed" + "pointed out");
    # "in our view" and "tend to": hedges (phrases); "found out": factive phrase with an irregular past, and its
    # "found" is the report verb "find".
    text = "In our view, the authors pointed out that results tend to vary, and we found out why."
    doc = step.apply(_doc(text), stats)
    assert stats.totals["hedge"] == 2
    assert stats.totals["assertive"] == 1
    assert stats.totals["report"] == 2
    assert stats.totals["factive"] == 1
    assert doc.meta["bias"]["words"] == 17


def test_combined_rate_counts_a_word_of_several_categories_once(step):
    stats = StepStats(step="bias")
    doc = step.apply(_doc("They claimed it."), stats)  # claimed: hedge (listed form), assertive, report verb
    assert (stats.totals["hedge"], stats.totals["assertive"], stats.totals["report"]) == (1, 1, 1)
    assert stats.totals["bias_cues"] == 1
    assert doc.meta["bias"]["bias_cue_rate"] == pytest.approx(100 / 3, abs=1e-3)


def test_neutral_technical_paragraph_scores_low_and_is_kept(step):
    stats = StepStats(step="bias")
    doc = step.apply(_doc(NEUTRAL), stats)
    assert isinstance(doc, Doc)
    assert doc.meta["bias"]["offensive"] < 0.1
    assert stats.kinds == {}


def test_insult_in_a_technical_document_is_dropped_with_its_sentence(step):
    stats = StepStats(step="bias")
    out = step.apply(_doc(NEUTRAL + " " + INSULT + " " + NEUTRAL), stats)
    assert isinstance(out, Drop) and out.reason == "offensive"
    assert out.evidence.startswith("1.00: ") and INSULT in out.evidence


def test_tag_action_keeps_and_counts(step):
    s = Bias(BiasConfig(action="tag", max_bias_cue_rate=20.0), CurateContext(name="t", language="en"))
    s.setup()
    stats = StepStats(step="bias")
    doc = s.apply(_doc(INSULT + " It is possible that he realized the truth."), stats)
    assert isinstance(doc, Doc) and doc.meta["bias"]["offensive"] > 0.99
    assert stats.kinds == {"offensive": 1, "bias_cues_high": 1}
    assert [e["reason"] for e in stats.examples] == ["offensive", "bias_cues_high"]


def test_other_languages_pass_through_unscored(step):
    stats = StepStats(step="bias")
    german = "Die Funktion gibt die Anzahl der gelesenen Bytes zurück. Sie blockiert, bis Daten vorliegen."
    doc = step.apply(_doc(german, {"language": "de"}), stats)
    assert isinstance(doc, Doc) and "bias" not in doc.meta
    assert stats.kinds == {"bias_skipped_language": 1} and stats.totals == {}
    de = Bias(BiasConfig(), CurateContext(name="t", language="de"))
    de.setup()
    assert "bias" not in de.apply(_doc(german), stats).meta
    assert "bias" in de.apply(_doc(NEUTRAL, {"language": "en"}), stats).meta  # the document's own tag wins


def test_categories_can_be_switched_off():
    s = Bias(BiasConfig(categories=("hedge",), offensive=False), CurateContext(name="t"))
    s.setup()
    doc = s.apply(_doc("It is possible that he realized the truth. " + INSULT), StepStats(step="bias"))
    assert set(doc.meta["bias"]) == {"words", "hedge", "bias_cue_rate"}
    assert s.scorer is None


def test_fast_scorer_equals_the_package_on_the_demo_corpus():
    from profanity_check import predict_prob

    scorer = _OffensiveScorer(1)
    assert scorer.fast
    corpus = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus" / "en-vim.jsonl"
    texts = [json.loads(line)["text"][:3000] for line in corpus.read_text(encoding="utf-8").splitlines()[:5]]
    texts += [INSULT, NEUTRAL, "ok"]
    # The arithmetic on vocabulary indices must give the package's own probabilities, text by text.
    segments = [[scorer.vocab[t] for t in scorer._TOKEN.findall(x.lower()) if t in scorer.vocab] for x in texts]
    keep = [i for i, s in enumerate(segments) if s]
    mine = scorer._probabilities([segments[i] for i in keep])
    np.testing.assert_allclose(mine, predict_prob([texts[i] for i in keep]), atol=1e-12)


@pytest.mark.parametrize("cfg", [{"categories": ("hedges",)}, {"max_offensive": 2.0}, {"action": "remove"},
                                 {"max_bias_cue_rate": -1.0}, {"min_segment_words": 0}])
def test_bad_config_is_refused(cfg):
    with pytest.raises(ValueError):
        BiasConfig(**cfg).check()


def test_technical_documentation_of_the_demo_corpus_is_kept(step):
    corpus = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus"
    stats = StepStats(step="bias")
    for name in ("en-manpages.jsonl", "en-python.jsonl", "en-vim.jsonl"):
        for line in (corpus / name).read_text(encoding="utf-8").splitlines()[:25]:
            doc = step.apply(_doc(json.loads(line)["text"]), stats)
            assert isinstance(doc, Doc) and doc.meta["bias"]["offensive"] < 0.9
    assert stats.kinds == {}
