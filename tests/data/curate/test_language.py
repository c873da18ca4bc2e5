"""The language step: paragraphs of the shipped demo corpus in English, German and French, short texts, `multi`."""

import json
from pathlib import Path

import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats
from stemma.data.curate.steps.language import LanguageConfig, LanguageId

CORPUS = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus"


def _paragraph(name: str, row: int = 0) -> str:
    """The first 1200 characters of a document of the demo corpus (a real man page, not a crafted sentence)."""
    with open(CORPUS / name, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == row:
                return json.loads(line)["text"][:1200]
    raise AssertionError(f"{name} has no row {row}")


EN, DE, FR = _paragraph("en-manpages.jsonl"), _paragraph("de-manpages.jsonl"), _paragraph("fr-manpages.jsonl")


def _step(language: str | None = "en", **cfg) -> LanguageId:
    step = LanguageId(LanguageConfig(**cfg), CurateContext(name="t", language=language))
    step.setup()
    return step


@pytest.fixture(scope="module")
def en_step() -> LanguageId:
    return _step("en")


def _doc(text: str, i: int = 0) -> Doc:
    return Doc(id=f"{i:016x}", text=text, split="train", meta={})


def test_english_kept_german_and_french_dropped(en_step):
    stats = StepStats(step="language")
    en = en_step.apply(_doc(EN, 1), stats)
    assert isinstance(en, Doc)
    assert en.meta["language"] == "en" and en.meta["language_confidence"] > 0.9
    de = en_step.apply(_doc(DE, 2), stats)
    fr = en_step.apply(_doc(FR, 3), stats)
    assert isinstance(de, Drop) and de.reason == "language_mismatch" and de.evidence.startswith("de (")
    assert isinstance(fr, Drop) and fr.reason == "language_mismatch" and fr.evidence.startswith("fr (")
    assert stats.kinds == {"lang:en": 1, "lang:de": 1, "lang:fr": 1}


def test_every_document_of_the_demo_corpus_is_its_files_language(en_step):
    stats = StepStats(step="language")
    for name, code in [("en-python.jsonl", "en"), ("en-vim.jsonl", "en"), ("de-manpages.jsonl", "de"),
                       ("fr-manpages.jsonl", "fr")]:
        for row in range(3):
            doc = _doc(_paragraph(name, row))
            en_step.apply(doc, stats)
            assert doc.meta["language"] == code, (name, row)
    assert stats.kinds == {"lang:en": 6, "lang:de": 3, "lang:fr": 3}


def test_short_ambiguous_text_is_kept_as_unknown(en_step):
    # Six Latin-script candidates: an ambiguous word needs the model of every candidate of its script, and loading
    # all of the default set's would dominate the test's time.
    latin = _step("en", languages=("en", "de", "fr", "es", "it", "nl"))
    stats = StepStats(step="language")
    for i, (step, text) in enumerate([(latin, "Hallo"), (latin, "Taxi"), (latin, "ls -la /tmp"),
                                      (en_step, "12345 678"), (en_step, "")]):
        doc = step.apply(_doc(text, i), stats)
        assert isinstance(doc, Doc), text
        assert doc.meta["language"] == "unknown", text
        assert doc.meta["language_confidence"] < 0.5
    assert stats.kinds == {"lang:unknown": 5}


def test_multi_keeps_everything_and_tags():
    for step in (_step("en", expected="multi"), _step("multi"), _step(None)):
        stats = StepStats(step="language")
        out = [step.apply(_doc(t, i), stats) for i, t in enumerate([EN, DE, FR])]
        assert all(isinstance(d, Doc) for d in out)
        assert [d.meta["language"] for d in out] == ["en", "de", "fr"]
        assert stats.kinds == {"lang:en": 1, "lang:de": 1, "lang:fr": 1}


def test_tag_action_keeps_and_reports_the_mismatch():
    step = _step("en", action="tag")
    stats = StepStats(step="language")
    de = step.apply(_doc(DE), stats)
    assert isinstance(de, Doc) and de.meta["language"] == "de"
    assert stats.kinds == {"lang:de": 1, "language_mismatch": 1}
    assert stats.examples[0]["action"] == "flagged" and stats.examples[0]["evidence"].startswith("de (")


def test_expected_overrides_the_declared_language_and_joins_the_candidates():
    # Irish is not a default candidate: expecting it adds it, so an Irish dataset is not dropped wholesale.
    step = _step("en", expected="de,ga", languages=("en", "fr"))
    stats = StepStats(step="language")
    assert isinstance(step.apply(_doc(DE), stats), Doc)
    assert isinstance(step.apply(_doc(EN), stats), Drop)
    assert step.expected == {"de", "ga"}


def test_short_latin_or_cyrillic_text_is_unknown_in_the_low_accuracy_mode(en_step):
    # A clear French sentence of 43 characters: trigrams alone mislabel such short texts, so the default (low-accuracy)
    # mode keeps it as unknown; the high-accuracy models identify it. Scripts that decide the language alone are
    # identified in either mode, however short.
    french = "Bonjour tout le monde, comment allez-vous ?"
    russian = "Привет, как дела? Это короткий текст."
    korean = "자연어 처리는 컴퓨터 과학과 인공지능의 한 분야이다."
    greek = "Γεια σου κόσμε, αυτό είναι ένα κείμενο."
    assert en_step.config.low_accuracy and en_step.config.short_chars == 120
    stats = StepStats(step="language")
    got = [en_step.apply(_doc(t, i), stats) for i, t in enumerate([french, russian, korean, greek])]
    assert [d.meta["language"] for d in got[:2]] == ["unknown", "unknown"]
    assert all(isinstance(d, Doc) for d in got[:2])
    assert isinstance(got[2], Drop) and got[2].evidence.startswith("ko (")
    assert isinstance(got[3], Drop) and got[3].evidence.startswith("el (")
    # From 120 characters on, the low-accuracy mode identifies Latin-script text as well.
    long_french = _paragraph("fr-manpages.jsonl", 1)[:130]
    assert en_step.apply(_doc(long_french), stats).evidence.startswith("fr (")
    high = _step("en", low_accuracy=False, languages=("en", "de", "fr", "es"))
    out = high.apply(_doc(french), StepStats(step="language"))
    assert isinstance(out, Drop) and out.evidence.startswith("fr (")


@pytest.mark.parametrize("cfg", [{"languages": ("english",)}, {"languages": ()}, {"expected": "en,xyz"},
                                 {"action": "delete"}, {"min_confidence": 1.5}, {"sample_chars": -1},
                                 {"short_chars": -1}, {"sample_chars": 100}])
def test_bad_config_is_refused(cfg):
    with pytest.raises(ValueError):
        LanguageConfig(**cfg).check()
