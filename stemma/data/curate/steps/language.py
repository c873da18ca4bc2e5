"""Language identification: tag each document with its language and drop those not in the dataset's language.

Detection is Lingua's (``lingua-language-detector``: character n-gram models of 1 to 5 letters shipped inside the
wheel, with a rule-based first pass on scripts and characters), restricted to a candidate set of languages: a smaller
set is faster and, on short texts, more accurate than all 75 of Lingua's languages. Lingua's confidence values are
relative probabilities over the candidate set (they sum to 1), so ``min_confidence`` reads as "the best language has at
least this share". A document whose best share is lower is tagged ``unknown`` and always kept: short or mixed texts
(a table, a code listing, one sentence) are not evidence of a wrong language.

Memory: Lingua loads a language's models when a text needs them. Its high-accuracy models (1- to 5-grams) take
about 20 MB per language; a short or ambiguous text ("Hallo", "Taxi") needs those of every candidate of its script,
so a worker that meets one holds about 530 MB with the 23 default languages. Its low-accuracy mode (trigrams only)
holds about 30 MB for all 23. Lingua documents the low-accuracy mode as reliable from 120 characters on, and so it
measured here: on sentences of the shipped corpus, of 120 to 400 characters, 6 of 943 differed from their file's
language in either mode, and the 598 whole documents were identified alike (one English page in the German file);
below 120 characters it mislabelled 4 to 10% of them with high confidence, where the high-accuracy models mostly
said ``unknown``. So the default is the low-accuracy mode with samples shorter than ``short_chars`` tagged
``unknown`` (and kept) when written in the Latin or Cyrillic script, whose languages trigrams alone confuse: a worker
stays under 100 MB. ``low_accuracy: false`` identifies short texts too, at up to 530 MB per worker.

Speed, on the shipped corpus (598 documents, 4.2 MB: man pages in en/de/fr, Vim and Python documentation), one
core, reading the first 1000 characters: about 740 docs/s (5 MB/s of whole documents) in either mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import regex

from ....errors import DataError
from ..base import Doc, DocumentStep, Drop, StepStats, register

DEFAULT_LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv", "da", "fi", "cs", "ro", "hu", "tr", "ru",
                     "uk", "el", "ar", "hi", "zh", "ja", "ko")
"""Widely written languages across the main scripts (Latin, Cyrillic, Greek, Arabic, Devanagari, Han, Kana, Hangul),
so that a document in another script is not forced onto a Latin-script language."""

UNKNOWN = "unknown"
_CLOSE_SCRIPTS = regex.compile(r"[\p{Latin}\p{Cyrillic}]")
"""Scripts shared by several default languages that trigrams alone tell apart unreliably in a short text (15 Latin-
script ones, Russian and Ukrainian); in the others (Greek, Arabic, Devanagari, Hangul, Han and Kana) the script
itself mostly decides, and short texts are identified in either mode."""
_CODE = re.compile(r"^[a-z]{2}$")
_ANY = ("multi", "any", "*")


def _code(value: str) -> str:
    """``en``, ``EN``, ``en-US``, ``en_GB`` -> ``en``: the dataset's language may carry a region."""
    return re.split(r"[-_]", value.strip())[0].lower()


@dataclass(frozen=True)
class LanguageConfig:
    """Which languages are candidates, which are expected, and what to do with the others."""

    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    """Candidate languages (ISO 639-1 codes) the detector chooses among; the expected languages are added to them."""
    expected: str | None = None
    """Language(s) the documents should be in, ISO 639-1 codes separated by commas (``en`` or ``en,de``). None (the
    default) takes the dataset's declared language; ``multi`` (or a dataset declared ``multi`` or without a language)
    accepts every language and only tags."""
    min_confidence: float = 0.5
    """Smallest share of the best language (0-1) for a detection to count; below it the document is tagged
    ``unknown`` and kept. A clear paragraph scores above 0.9; one short sentence often below 0.5."""
    action: str = "drop"
    """What to do with a document detected in an unexpected language: ``drop`` it, or ``tag`` it and keep it."""
    sample_chars: int = 1000
    """Characters from the start of the document the detector reads (0 = all): the cost grows with the length and
    500 characters already identify every document of the demo corpus."""
    low_accuracy: bool = True
    """Lingua's low-accuracy mode (trigram models: about 30 MB for the 23 default languages, where the high-accuracy
    models take up to 530 MB once short or ambiguous texts have needed them all). As accurate from ``short_chars``
    characters on; a shorter sample in the Latin or Cyrillic script is tagged ``unknown`` and kept, since trigrams
    alone mislabel short texts of these scripts' many languages."""
    short_chars: int = 120
    """With ``low_accuracy``, samples in the Latin or Cyrillic script shorter than this are tagged ``unknown`` (Lingua
    documents its low-accuracy mode for texts of at least 120 characters)."""

    def check(self) -> None:
        bad = [c for c in self.languages if not _CODE.match(c)]
        if bad or not self.languages:
            raise ValueError(f"languages must be ISO 639-1 codes (two lowercase letters), got {bad or 'none'}")
        if self.expected is not None and _code(self.expected) not in _ANY:
            bad = [c for c in self.expected.split(",") if not _CODE.match(_code(c))]
            if bad:
                raise ValueError(f"expected must be ISO 639-1 codes separated by commas or 'multi', got {bad}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError("min_confidence must be between 0 and 1")
        if self.action not in ("drop", "tag"):
            raise ValueError(f"action must be 'drop' or 'tag', got {self.action!r}")
        if self.sample_chars < 0:
            raise ValueError("sample_chars must be >= 0 (0 = the whole document)")
        if self.short_chars < 0:
            raise ValueError("short_chars must be >= 0")
        if self.low_accuracy and 0 < self.sample_chars < self.short_chars:
            raise ValueError(f"sample_chars ({self.sample_chars}) below short_chars ({self.short_chars}) would "
                             "leave every document unknown in low-accuracy mode")


@register
class LanguageId(DocumentStep):
    """Tag ``meta["language"]`` and ``meta["language_confidence"]``; drop (or tag) documents in other languages."""

    name = "language"
    config_cls = LanguageConfig
    version = 2
    """2: low-accuracy mode by default, samples shorter than ``short_chars`` tagged ``unknown`` in it."""

    def setup(self) -> None:
        try:
            from lingua import IsoCode639_1, LanguageDetectorBuilder
        except ImportError:
            raise DataError("the language step needs the package lingua-language-detector: "
                            "pip install lingua-language-detector") from None
        cfg = self.config
        self.expected = self._expected()
        codes = sorted(set(cfg.languages) | (self.expected or set()))
        isos = []
        for c in codes:
            try:
                isos.append(IsoCode639_1.from_str(c))
            except ValueError:
                raise DataError(f"the language step: Lingua has no model for language {c!r}") from None
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*isos)
        if cfg.low_accuracy:
            builder = builder.with_low_accuracy_mode()
        # Models load on first need, not all now: Lingua's rule-based first pass (scripts, characters) rules out most
        # candidates per text, so a corpus in one script never loads the others' models.
        self.detector = builder.build()

    def _expected(self) -> set[str] | None:
        """The accepted languages, or None when every language is accepted."""
        value = self.config.expected if self.config.expected is not None else self.ctx.language
        if value is None or _code(value) in _ANY:
            return None
        return {_code(c) for c in value.split(",") if c.strip()}

    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        cfg = self.config
        sample = doc.text[:cfg.sample_chars] if cfg.sample_chars else doc.text
        if cfg.low_accuracy and len(sample.strip()) < cfg.short_chars and _CLOSE_SCRIPTS.search(sample):
            values = []
        else:
            values = self.detector.compute_language_confidence_values(sample)
        best = values[0] if values else None
        if best is None or best.value < self.config.min_confidence:
            code, conf = UNKNOWN, best.value if best is not None else 0.0
        else:
            code, conf = best.language.iso_code_639_1.name.lower(), best.value
        conf = round(float(conf), 4)
        doc.meta["language"] = code
        doc.meta["language_confidence"] = conf
        stats.count(f"lang:{code}")
        if code == UNKNOWN or self.expected is None or code in self.expected:
            return doc
        evidence = f"{code} ({conf:.2f})"
        if self.config.action == "drop":
            return Drop("language_mismatch", evidence)
        stats.count("language_mismatch")
        stats.example("flagged", doc, "language_mismatch", evidence)
        return doc
