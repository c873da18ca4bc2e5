"""Bias cues and offensive language: per-document scores, tagged into the metadata, filtered or flagged by threshold.

Two measures, both English-only (documents tagged with another language are passed through unscored):

**Linguistic bias cues**, after Recasens, Danescu-Niculescu-Mizil & Jurafsky (2013), "Linguistic Models for Analyzing
and Detecting Biased Language" (ACL), and Hutto, Folds & Appling (2015), "Computationally Detecting and Quantifying
the Degree of Bias in Sentence-Level Text of News Stories" (HUSO): the rate of words from published lexicons of
epistemological and framing bias, per 100 words: hedges (Hyland 2005), factive and assertive verbs (Hooper 1975),
implicative verbs (Karttunen 1971), report verbs (Recasens et al. 2013) and strong subjectives (Riloff & Wiebe 2003,
the MPQA subjectivity lexicon). The lexicons are plain text files in ``../lexicons`` (sources and licences in their
headers). Verb lexicons hold lemmas and also match inflected forms (``realized`` is a factive), expanded once per
worker with lemminflect; hedges are listed by Hyland as word forms and match literally. Both papers count cues per
sentence as classifier features; a corpus is better described by rates, so this step counts them per document and
sums the counts (``stats.add``) so that the datasheet can report corpus-level rates per 100 words.

**Offensive language**, after Davidson, Warmsley, Macy & Weber (2017), "Automated Hate Speech Detection and the
Problem of Offensive Language" (ICWSM): ``alt-profanity-check``'s linear SVM over TF-IDF unigrams (with sigmoid
calibration), trained on Davidson et al.'s tweets and human-labelled toxic comments. Its probability is read per
*segment*, not per document. Measured on the shipped demo corpus (357 English documents), and with insults put one
at a time in the middle of a 17,000-character man page:

- per document, TF-IDF normalisation dilutes one sentence in a long text: six profane insults score 0.005;
- per sentence, they score 1.0, but so do fragments of technical text whose only known word is ``kill``
  (``SEE ALSO kill(1)``, ``Kill the subprocess.``): 7 English documents of the corpus above 0.9;
- per segment, a sentence joined with the following ones until it holds ``min_segment_words`` (3) words the model
  knows: insults of three known words or more still score 1.0, shorter ones are diluted by the next sentence
  ("Go to hell, bitch." 0.53, "You suck." 0.2), and no English document of the corpus scores above 0.9 (the
  highest, 0.87: ":s/cow/pig/ Now you can press <Enter> directly."). A short document is one segment, scored whole.

The document's score is the maximum over its segments. The model only knows English words (German man pages score
0.95 per sentence on median), hence the language gate. It detects profanity far better than hate without swear words
("Those people are disgusting animals and should be wiped out." scores 0.67), a known limit of lexical models
(Davidson et al. 2017).

Speed on the demo corpus, one core: about 5.5 MB/s for the cues alone (``offensive: false``), 1.4 to 2 MB/s with the
classifier.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ....errors import DataError
from ..base import Doc, DocumentStep, Drop, StepStats, register

LEXICONS = Path(__file__).resolve().parents[1] / "lexicons"

CATEGORIES: dict[str, tuple[str, str]] = {
    "hedge": ("hedges_hyland2005.txt", "literal"),
    "factive": ("factives_hooper1975.txt", "verb"),
    "assertive": ("assertives_hooper1975.txt", "verb"),
    "implicative": ("implicatives_karttunen1971.txt", "verb"),
    "report": ("report_verbs_recasens2013.txt", "verb"),
    "subjective": ("strong_subjectives_riloff2003.txt", "marked"),
}
"""Category -> (lexicon file, how entries match): ``literal`` as written; ``verb`` a lemma that also matches its
verb inflections (the first word of a phrase: ``find out``, ``found out``); ``marked`` as written, and with every
inflection when the entry ends in ``*`` (the MPQA release's stemmed clues)."""

ANY = "bias_cues"
"""Name of the count of cues of any enabled category (each cue once)."""
# Words for the cue rates: letters, with inner apostrophes and hyphens (couldn't, so-called, ill-advised).
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
# Sentences: after . ! ? and whitespace, or at a blank line (man pages and plain text wrap sentences over lines).
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def read_lexicon(path: Path) -> list[tuple[str, bool]]:
    """Entries of a lexicon file: ``(word or phrase, stemmed)``; ``#`` lines are comments, ``*`` marks stemmed."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((line[:-1], True) if line.endswith("*") else (line, False))
    return out


class _Cues:
    """The forms of every enabled category, counted in one pass over a document's words.

    Single words are counted from a `Counter` of the document's words (C speed); phrases (``in our view``, ``found
    out``) are matched on the word sequence at the positions where a phrase's first word occurs, so a document pays
    one scan whatever the number of phrases. A phrase counts as one cue: its words that are also single-word cues of
    the same category are not counted again.
    """

    def __init__(self, forms: dict[str, set[str]]):
        self.singles = {cat: frozenset(f for f in fs if " " not in f) for cat, fs in forms.items()}
        self.phrases = {cat: frozenset(tuple(f.split()) for f in fs if " " in f) for cat, fs in forms.items()}
        # All categories together count each cue once (``claim`` is a hedge, an assertive and a report verb).
        self.singles[ANY] = frozenset().union(*self.singles.values())
        self.phrases[ANY] = frozenset().union(*self.phrases.values())
        self.overlap = {cat: {p: sum(w in self.singles[cat] for w in p) for p in ps}
                        for cat, ps in self.phrases.items()}
        by_first: dict[str, list[tuple[str, ...]]] = {}
        for p in sorted(self.phrases[ANY], key=len, reverse=True):  # longest first: one phrase per position
            by_first.setdefault(p[0], []).append(p)
        self.by_first = by_first

    def count(self, words: list[str]) -> dict[str, int]:
        counts = Counter(words)
        found: Counter = Counter()
        if not self.by_first.keys().isdisjoint(counts):
            for i in [i for i, w in enumerate(words) if w in self.by_first]:
                for p in self.by_first[words[i]]:
                    if tuple(words[i:i + len(p)]) == p:
                        found[p] += 1
                        break
        out = {}
        for cat, singles in self.singles.items():
            n = sum(counts[w] for w in singles.intersection(counts))
            phrases, overlap = self.phrases[cat], self.overlap[cat]
            n += sum(k * (1 - overlap[p]) for p, k in found.items() if p in phrases)
            out[cat] = n
        return out


class _SkipSpacy:
    """An import hook under which ``import spacy`` fails, installed only while lemminflect is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "spacy" or name.startswith("spacy."):
            raise ImportError("not imported for lemminflect's optional spaCy extensions")
        return None


def _lemminflect():
    """lemminflect's ``getAllInflections``, imported without spaCy.

    On import lemminflect registers spaCy token extensions whenever spaCy is importable, which imports all of spaCy
    (seconds, and a hundred MB) for a hook this step does not use. A spaCy that is already imported is left alone."""
    import sys

    hook = None
    if "lemminflect" not in sys.modules and "spacy" not in sys.modules:
        hook = _SkipSpacy()
        sys.meta_path.insert(0, hook)
    try:
        from lemminflect import getAllInflections
    except ImportError:
        raise DataError("the bias step needs the package lemminflect: pip install lemminflect") from None
    finally:
        if hook is not None:
            sys.meta_path.remove(hook)
    return getAllInflections


def expand(entries: list[tuple[str, bool]], how: str) -> set[str]:
    """Every surface form an entry matches (lowercase), inflected with lemminflect where the lexicon calls for it."""
    getAllInflections = _lemminflect()  # noqa: N806 - lemminflect's name

    forms: set[str] = set()
    for entry, stemmed in entries:
        entry = entry.lower()
        forms.add(entry)
        if how == "literal" or (how == "marked" and not stemmed):
            continue
        head, _, rest = entry.partition(" ")
        table = getAllInflections(head, upos="VERB") if how == "verb" else getAllInflections(head)
        for variants in table.values():
            forms.update(f"{v.lower()} {rest}" if rest else v.lower() for v in variants)
    return forms


@dataclass(frozen=True)
class BiasConfig:
    """Which scores to compute and which thresholds filter (or flag) documents."""

    categories: tuple[str, ...] = tuple(CATEGORIES)
    """Bias cue categories to count: hedge, factive, assertive, implicative, report, subjective."""
    offensive: bool = True
    """Score offensive language with alt-profanity-check's classifier (needs scikit-learn)."""
    max_offensive: float | None = 0.9
    """Documents whose offensive score (0-1, the maximum over segments) is above this are dropped or flagged; None
    = score only; ignored when ``offensive`` is false. 0.9 flags no English document of the demo corpus; profane
    insults score about 1.0."""
    max_bias_cue_rate: float | None = None
    """Documents with more bias cues than this per 100 words (all categories together) are dropped or flagged;
    None = score only. The English documentation of the demo corpus has 6.5 (man pages) to 9.9 (Vim) per 100
    words, at most 12 in 95% of its documents: the lexicons hold common verbs (see, find, show, write)."""
    action: str = "drop"
    """What to do with a document above a threshold: ``drop`` it, or ``tag`` it (count it, keep an example)."""
    languages: tuple[str, ...] = ("en",)
    """Languages the lexicons and the classifier are for (ISO 639-1). A document tagged with another language
    (``meta["language"]`` from the language step, else the dataset's declared language) is passed through unscored;
    an undeclared, ``multi`` or ``unknown`` language is scored."""
    min_segment_words: int = 3
    """Words the classifier knows that a segment needs: shorter sentences are joined to the following ones, so a
    lone technical word (``kill``) does not decide a segment."""

    def check(self) -> None:
        unknown = sorted(set(self.categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown bias cue categories {unknown} (known: {', '.join(CATEGORIES)})")
        if self.max_offensive is not None and not 0.0 <= self.max_offensive <= 1.0:
            raise ValueError("max_offensive must be between 0 and 1 (or None)")
        if self.max_bias_cue_rate is not None and self.max_bias_cue_rate < 0:
            raise ValueError("max_bias_cue_rate must be >= 0 (or None)")
        if self.action not in ("drop", "tag"):
            raise ValueError(f"action must be 'drop' or 'tag', got {self.action!r}")
        if self.min_segment_words < 1:
            raise ValueError("min_segment_words must be >= 1")


_PROBES = ["You are a worthless stupid idiot.", "The function returns the number of bytes written.",
           "kill -9 kills the process; the kill is final", "What the hell is this shit, man?"]
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern, which the vectoriser was fit with
_NOT_EXACT = 4  # exit status of the export child


def export_parameters(out: str) -> None:
    """Run in a child process: alt-profanity-check's fitted parameters as plain arrays in ``out`` (an .npz).

    Importing the package loads its trained vectoriser and model with joblib (a pickle) from the package's own
    installed data files: code and model come from the same wheel, nothing is read from elsewhere. That import brings
    in scikit-learn and SciPy, about 170 MB that a process never gives back; a curation worker needs only the arrays
    (a few MB), so the import happens here and the child exits. Exits with `_NOT_EXACT` when the arithmetic of
    `_OffensiveScorer` does not reproduce ``predict_prob`` on the probes (another package version)."""
    import sys

    from profanity_check import profanity_check as pc  # installed: `_cache_path` found its version

    vec, model = pc.vectorizer, pc.model
    try:
        if vec.lowercase is not True or vec.ngram_range != (1, 1) or vec.norm != "l2" or vec.sublinear_tf:
            raise ValueError("vectoriser settings differ")
        words = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
        cc = model.calibrated_classifiers_
        arrays = {"words": np.array(words, dtype=str), "idf": np.asarray(vec.idf_, dtype=np.float64),
                  "w": np.stack([c.estimator.coef_[0] for c in cc], axis=1),
                  "b": np.array([c.estimator.intercept_[0] for c in cc]),
                  "a_cal": np.array([c.calibrators[0].a_ for c in cc]),
                  "b_cal": np.array([c.calibrators[0].b_ for c in cc])}
        if [vec.vocabulary_[w] for w in words] != list(range(len(words))):
            raise ValueError("vocabulary indices are not 0..n-1")
        scorer = _OffensiveScorer.from_arrays(arrays, 1)
        mine = scorer._probabilities([scorer.indices(t) for t in _PROBES])
        if not np.allclose(mine, pc.predict_prob(_PROBES), atol=1e-9):
            raise ValueError("probabilities differ")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        sys.exit(_NOT_EXACT)
    np.savez(out, **arrays)


def _cache_path() -> Path:
    """Where the exported parameters are kept, named by the versions that decide them; the one place that refuses
    a missing alt-profanity-check."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        key = f"{version('alt-profanity-check')}-{version('scikit-learn')}"
    except PackageNotFoundError:
        raise DataError("the bias step's offensive score needs the package alt-profanity-check: "
                        "pip install alt-profanity-check (or set offensive: false)") from None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stemma"
    return root / f"offensive-{key}.npz"


@functools.lru_cache(maxsize=1)
def _parameters() -> dict[str, np.ndarray] | None:
    """The exported parameters (see `export_parameters`), once per machine and package versions: the first worker
    exports them under a file lock while the others wait, so one child at a time holds scikit-learn. None when they
    are not exact."""
    cache = _cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.exists():
            tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
            code = f"from stemma.data.curate.steps.bias import export_parameters; export_parameters({str(tmp)!r})"
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode == _NOT_EXACT:
                return None
            if r.returncode:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                raise DataError(f"loading alt-profanity-check's model failed: {last}")
            os.replace(tmp, cache)
    try:
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        cache.unlink(missing_ok=True)  # damaged: the next step set-up exports it again
        raise DataError(f"{cache}: damaged cache of alt-profanity-check's parameters, removed; run again") from None


class _OffensiveScorer:
    """alt-profanity-check's model, applied to many segments of one document in one matrix product.

    The package's ``predict_prob`` costs about 6 ms per call in scikit-learn's input checks, whatever the text's
    length (about 0.8 MB/s over the demo corpus); the same arithmetic done here with the package's own fitted
    parameters (vocabulary, idf, the calibrated SVMs' weights and sigmoids), exported by a child process
    (`export_parameters`), is about 11 times faster and keeps scikit-learn out of the worker. The export checks that
    both give the same probabilities on a few probes; otherwise the scorer uses ``predict_prob`` in-process.
    """

    _TOKEN = _TOKEN

    def __init__(self, min_words: int):
        params = _parameters()
        self.min_words = min_words
        self.fast = params is not None
        if self.fast:
            self._set(params)
        else:
            from profanity_check import profanity_check as pc

            self._pc = pc
            self.vocab = dict(pc.vectorizer.vocabulary_)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], min_words: int) -> _OffensiveScorer:
        self = cls.__new__(cls)
        self.min_words, self.fast = min_words, True
        self._set(arrays)
        return self

    def _set(self, a: dict[str, np.ndarray]) -> None:
        self.vocab = {str(w): i for i, w in enumerate(a["words"])}
        self.idf, self.w, self.b, self.a_cal, self.b_cal = a["idf"], a["w"], a["b"], a["a_cal"], a["b_cal"]

    def indices(self, text: str) -> list[int]:
        return [self.vocab[t] for t in self._TOKEN.findall(text.lower()) if t in self.vocab]

    def _probabilities(self, segments: list[list[int]]) -> np.ndarray:
        """P(offensive) of each segment (its vocabulary indices), exactly as the package's ``predict_prob``.

        TF-IDF with l2 norm, then the mean over the calibrated SVMs of sigmoid(a * (w.x + b) + c), in plain numpy:
        building scipy matrices for a few segments costs more than the arithmetic."""
        v = len(self.idf)
        rows = np.repeat(np.arange(len(segments), dtype=np.int64), [len(s) for s in segments])
        cols = np.fromiter((j for s in segments for j in s), dtype=np.int64, count=len(rows))
        keys, tf = np.unique(rows * v + cols, return_counts=True)  # (segment, term) pairs and their counts
        r, c = keys // v, keys % v
        x = tf * self.idf[c]
        norm = np.sqrt(np.bincount(r, weights=x * x, minlength=len(segments)))
        x = x / norm[r]
        f = np.stack([np.bincount(r, weights=x * self.w[c, k], minlength=len(segments))
                      for k in range(self.w.shape[1])], axis=1) + self.b
        return (1.0 / (1.0 + np.exp(self.a_cal * f + self.b_cal))).mean(axis=1)

    def score(self, text: str) -> tuple[float, str]:
        """The highest segment probability of ``text`` and that segment's text."""
        sentences = [s for s in _SENTENCE.split(text) if s and not s.isspace()]
        segments: list[list[int]] = []
        spans: list[tuple[int, int]] = []
        cur: list[int] = []
        start = 0
        for i, s in enumerate(sentences):
            cur.extend(self.vocab[t] for t in self._TOKEN.findall(s.lower()) if t in self.vocab)
            if len(cur) >= self.min_words:
                segments.append(cur)
                spans.append((start, i + 1))
                cur, start = [], i + 1
        if cur:  # the tail joins the last segment when it is too short to stand alone
            if segments and len(cur) < self.min_words:
                segments[-1].extend(cur)
                spans[-1] = (spans[-1][0], len(sentences))
            else:
                segments.append(cur)
                spans.append((start, len(sentences)))
        if not segments:
            return 0.0, ""
        texts = [" ".join(sentences[a:b]) for a, b in spans]
        p = self._probabilities(segments) if self.fast else np.asarray(self._pc.predict_prob(texts))
        i = int(np.argmax(p))
        return float(p[i]), texts[i]


@register
class Bias(DocumentStep):
    """Tag ``meta["bias"]`` with cue rates per 100 words and the offensive score; drop or flag above thresholds."""

    name = "bias"
    config_cls = BiasConfig

    def setup(self) -> None:
        self.cues = _Cues({cat: expand(read_lexicon(LEXICONS / CATEGORIES[cat][0]), CATEGORIES[cat][1])
                           for cat in self.config.categories})
        self.scorer = _OffensiveScorer(self.config.min_segment_words) if self.config.offensive else None
        self.languages = {c.lower() for c in self.config.languages}

    def _language(self, doc: Doc) -> str | None:
        lang = doc.meta.get("language") or self.ctx.language
        if not isinstance(lang, str) or lang in ("multi", "unknown"):
            return None
        return re.split(r"[-_]", lang)[0].lower()

    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        lang = self._language(doc)
        if lang is not None and lang not in self.languages:
            stats.count("bias_skipped_language")
            return doc
        words = _WORD.findall(doc.text.lower().replace("\u2019", "'"))
        n = len(words)
        per100 = 100.0 / n if n else 0.0
        scores: dict[str, float] = {"words": n}
        stats.add("words", n)
        for cat, c in self.cues.count(words).items():
            scores[cat if cat != ANY else "bias_cue_rate"] = round(c * per100, 4)
            stats.add(cat, c)
        rate = scores["bias_cue_rate"]
        reasons: list[tuple[str, str]] = []
        if self.scorer is not None:
            p, segment = self.scorer.score(doc.text)
            scores["offensive"] = round(p, 4)
            if self.config.max_offensive is not None and p > self.config.max_offensive:
                reasons.append(("offensive", f"{p:.2f}: {' '.join(segment.split())}"))
        if self.config.max_bias_cue_rate is not None and rate > self.config.max_bias_cue_rate:
            reasons.append(("bias_cues_high", f"{rate:.1f} cues per 100 words"))
        doc.meta["bias"] = scores
        if not reasons:
            return doc
        if self.config.action == "drop":
            return Drop(*reasons[0])
        for reason, evidence in reasons:
            stats.count(reason)
            stats.example("flagged", doc, reason, evidence)
        return doc
