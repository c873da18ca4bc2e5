"""Heuristic quality filters: Gopher quality and repetition (Rae et al. 2021) and C4 (Raffel et al. 2020).

The three steps follow datatrove 0.10.1's ``GopherQualityFilter``, ``GopherRepetitionFilter`` and
``C4QualityFilter`` rule for rule, with the same defaults and the same drop-reason names, so that a corpus curated
here keeps the documents a datatrove pipeline would keep.

datatrove counts words with spaCy's blank English tokenizer (``spacy.blank("en")``, plus its ``sentencizer`` for
C4's sentence count). spaCy is a heavy dependency for a tokenizer and runs it at 0.4 MB/s on the demo corpus (one
core), so this module re-implements that tokenizer's algorithm (whitespace chunks, then prefixes, suffixes, special
cases, URLs and infixes, exactly as ``spacy/tokenizer.pyx`` applies them) with the same rule lists, memoised per
whitespace-separated chunk as spaCy itself does. On the demo corpus its words are spaCy's on every document. Where it
differs from spaCy:

- character classes are Unicode properties (``\\p{L}``, ``\\p{Ll}``, ``\\p{Lu}``, ``\\p{So}``) where spaCy enumerates
  scripts: identical on Latin, Greek and Cyrillic text, a few rare letters and symbols of other scripts differ;
- special cases (``don't`` -> ``do n't``, ``e.g.``, emoticons) are the English and base tables of spaCy 3.8,
  regenerated below; a special case spanning two whitespace-separated chunks is not matched (spaCy never applies
  those either, it only lets them shadow an overlapping match).

Every language is tokenized with these English rules, as datatrove's filters do by default.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import ClassVar

import numpy as np
import regex

from ..base import Doc, DocumentStep, Drop, StepStats, register

# ------------------------------------------------------------------------------------ spaCy's English tokenizer
# The rule lists of spacy/lang/char_classes.py and spacy/lang/punctuation.py (spaCy 3.8, MIT licence), written the
# same way (space-separated regex pieces) so they can be compared line by line.
_ALPHA = r"\p{L}"
_ALPHA_LOWER = r"\p{Ll}\p{Lo}"
_ALPHA_UPPER = r"\p{Lu}\p{Lo}"
_ICONS = r"\p{So}"
_PUNCT = r"… …… , : ; \! \? ¿ ؟ ¡ \( \) \[ \] \{ \} < > _ # \* & 。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪"
_QUOTES = "\\' \" ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 \u2329 \u232a  ⟦ ⟧"
_HYPHENS = "- – — -- --- —— ~"
_CURRENCY = r"\$ £ € ¥ ฿ US\$ C\$ A\$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ € ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₴ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₽ ₾ ₿"
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh mph hPa "
    "Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² дм³ см см² см³ мм мм² мм³ нм кг г мг м/с "
    "км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тб"  # spaCy's list lacks a space here: kept as it is
    "كم كم² كم³ م م² م³ سم سم² سم³ مم مم² مم³ كم غرام جرام جم كغ ملغ كوب اكواب"
)


def _pieces(s: str) -> list[str]:
    return s.strip().split(" ")


def _merged(s: str) -> str:
    return s.strip().replace(" ", "|")


def _grouped(s: str) -> str:
    return s.strip().replace(" ", "")


_ELLIPSES = [r"\.\.+", "…"]
_PREFIXES = (["§", "%", "=", "—", "–", r"\+(?![0-9])"] + _pieces(_PUNCT) + _ELLIPSES + _pieces(_QUOTES)
             + _pieces(_CURRENCY) + [f"[{_ICONS}]"])
_SUFFIXES = (_pieces(_PUNCT) + _ELLIPSES + _pieces(_QUOTES) + [f"[{_ICONS}]"] + ["'s", "'S", "’s", "’S", "—", "–"]
             + [r"(?<=[0-9])\+", r"(?<=°[FfCcKk])\.", rf"(?<=[0-9])(?:{_merged(_CURRENCY)})",
                rf"(?<=[0-9])(?:{_merged(_UNITS)})",
                # "(?:" inside a character class is spaCy's own quirk: it adds "(", "?", ":", ")" and "|" (from the
                # merged punctuation) to the class; reproduced so that "x|." splits as in spaCy.
                rf"(?<=[0-9{_ALPHA_LOWER}%²\-\+{_merged(_PUNCT)}(?:{_grouped(_QUOTES)})])\.",
                rf"(?<=[{_ALPHA_UPPER}][{_ALPHA_UPPER}])\."])
_INFIXES = (_ELLIPSES + [f"[{_ICONS}]"]
            + [r"(?<=[0-9])[+\-\*^](?=[0-9-])",
               rf"(?<=[{_ALPHA_LOWER}{_grouped(_QUOTES)}])\.(?=[{_ALPHA_UPPER}{_grouped(_QUOTES)}])",
               rf"(?<=[{_ALPHA}]),(?=[{_ALPHA}])",
               rf"(?<=[{_ALPHA}0-9])(?:{_merged(_HYPHENS)})(?=[{_ALPHA}])",
               rf"(?<=[{_ALPHA}0-9])[:<>=/](?=[{_ALPHA}])"])
# spacy/lang/tokenizer_exceptions.py URL_PATTERN: a URL is one token, never split at its infixes.
_URL = (r"^(?:(?:[\w\+\-\.]{2,})://)?(?:\S+(?::\S*)?@)?(?:"
        r"(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
        r"(?!172\.(?:1[6-9]|2\d|3[0-1])(?:\.\d{1,3}){2})"
        r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
        r"(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))"
        r"|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
        rf"(?:[{_ALPHA_LOWER}]{{2,63}}))(?::\d{{2,5}})?(?:[/?#]\S*)?$")

_EMOTICONS = r"""
:) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; :( :-( :((
:-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P :-P :p :-p :O :-O :o :-o :0 :-0
:() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D xD XD xDD XDD 8D 8-D ^_^ ^__^ ^___^ >.< >.> <.< ._.
;_; -_- -__- v.v V.V v_v V_V o_o o_O O_o O_O 0_o o_0 0_0 o.O O.o O.O o.o 0.0 o.0 0.o @_@ <3 <33 <333 </3 (^_^)
(-_-) (._.) (>_<) (*_*) (¬_¬) ಠ_ಠ ಠ︵ಠ (ಠ_ಠ) ¯\(ツ)/¯ (╯°□°）╯︵┻━┻ ><(((*>
"""
_ENGLISH_ABBREVIATIONS = """
'd a.m. Adm. Bros. co. Co. Corp. D.C. Dr. e.g. E.g. E.G. Gen. Gov. i.e. I.e. I.E. Inc. Jr. Ltd. Md. Messrs. Mo.
Mont. Mr. Mrs. Ms. p.m. Ph.D. Prof. Rep. Rev. Sen. St. vs. v.s. Mt. Ak. Ala. Apr. Ariz. Ark. Aug. Calif. Colo. Conn.
Dec. Del. Feb. Fla. Ga. Ia. Id. Ill. Ind. Jan. Jul. Jun. Kan. Kans. Ky. La. Mar. Mass. Mich. Minn. Miss. N.C. N.D.
N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. S.C. Sep. Sept. Tenn. Va. Wash. Wis.
'S 's ‘S ‘s and/or w/o 're 'Cause 'cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz 'bout ma'am Ma'am o'clock O'clock
lovin' Lovin' lovin Lovin havin' Havin' havin Havin doin' Doin' doin Doin goin' Goin' goin Goin
"""


def _special_cases() -> dict[str, tuple[str, ...]]:
    """spaCy 3.8's tokenizer exceptions for English (spacy/lang/en/tokenizer_exceptions.py plus the base table).

    Only the token boundaries matter here (not spaCy's norms), so the table is regenerated as spaCy generates it:
    pronoun and verb contractions with and without the apostrophe, times, abbreviations, emoticons, then a copy of
    every entry with the typographic apostrophe.
    """
    exc: dict[str, tuple[str, ...]] = {}

    def add(*parts: str) -> None:
        exc["".join(parts)] = parts

    def cased(*words: str) -> list[str]:
        return [w for word in words for w in (word, word.title())]

    for orth in cased("i"):
        for parts in (("'m",), ("m",), ("'m", "a"), ("m", "a")):
            add(orth, *parts)
    for orth in cased("i", "you", "he", "she", "it", "we", "they"):
        for parts in (("'ll",), ("ll",), ("'ll", "'ve"), ("ll", "ve"), ("'d",), ("d",), ("'d", "'ve"), ("d", "ve")):
            add(orth, *parts)
    for orth in cased("i", "you", "we", "they"):
        add(orth, "'ve")
        add(orth, "ve")
    for orth in cased("you", "we", "they"):
        add(orth, "'re")
        add(orth, "re")
    for orth in cased("he", "she", "it"):
        add(orth, "'s")
        add(orth, "s")
    singular, plural = ("that", "this"), ("these", "those")
    for word in ("who", "what", "when", "where", "why", "how", "there", *singular, *plural):
        for orth in cased(word):
            if word not in plural:
                add(orth, "'s")
                add(orth, "s")
            for parts in (("'ll",), ("ll",), ("'ll", "'ve"), ("ll", "ve")):
                add(orth, *parts)
            if word not in singular:
                for parts in (("'re",), ("re",), ("'ve",), ("ve",)):
                    add(orth, *parts)
            for parts in (("'d",), ("d",), ("'d", "'ve"), ("d", "ve")):
                add(orth, *parts)
    for orth in cased("ca", "could", "do", "does", "did", "had", "may", "might", "must", "need", "ought", "sha",
                      "should", "wo", "would"):
        for parts in (("n't",), ("nt",), ("n't", "'ve"), ("nt", "ve")):
            add(orth, *parts)
    for orth in cased("could", "might", "must", "should", "would"):
        add(orth, "'ve")
        add(orth, "ve")
    for orth in cased("ai", "are", "is", "was", "were", "have", "has", "dare"):
        add(orth, "n't")
        add(orth, "nt")
    for orth in cased("doin", "goin", "nothin", "nuthin", "ol", "somethin"):
        add(orth)
        add(orth + "'")
    for orth in ("em", "ll", "nuff"):
        add(orth)
        add("'" + orth)
    for h in range(1, 13):
        for period in ("a.m.", "am", "p.m.", "pm"):
            add(str(h), period)
    for parts in (("y'", "all"), ("y", "all"), ("how", "'d", "'y"), ("How", "'d", "'y"), ("not", "'ve"),
                  ("not", "ve"), ("Not", "'ve"), ("Not", "ve"), ("can", "not"), ("Can", "not"), ("gon", "na"),
                  ("Gon", "na"), ("got", "ta"), ("Got", "ta"), ("let", "'s"), ("Let", "'s"), ("c'm", "on"),
                  ("C'm", "on")):
        add(*parts)
    for orth in _ENGLISH_ABBREVIATIONS.split():
        add(orth)
    for orth in ("Ill", "ill", "Its", "its", "Hell", "hell", "Shell", "shell", "Shed", "shed", "were", "Were",
                 "Well", "well", "Whore", "whore"):
        exc.pop(orth, None)
    # The base table comes first and English entries override it.
    base: dict[str, tuple[str, ...]] = {}
    for orth in [" ", "\t", "\\t", "\n", "\\n", "\u2014", "\u00a0", "'", '\\")', "<space>", "''", "C++",
                 *(c + "." for c in "abcdefghijklmnopqrstuvwxyzäöü"), *_EMOTICONS.split()]:
        base[orth] = (orth,)
    for u in "cfkCFK":
        base[f"°{u}."] = ("°", u, ".")
    base.update(exc)
    for key, parts in list(base.items()):
        if "'" in key:
            base[key.replace("'", "’")] = tuple(p.replace("'", "’") for p in parts)
    return base


_ASCII_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_DIGIT = re.compile("[0-9]")


class _Memo(dict):
    """A dict computing missing values with ``fn``: ``map(memo.__getitem__, keys)`` then runs in C on hits."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def __missing__(self, key):
        value = self[key] = self._fn(key)
        return value


class _EnglishWords:
    """Words of a text as ``spacy.blank("en")`` tokenizes them, minus whitespace tokens (datatrove strips them).

    Written by hand (rather than calling spaCy) for speed: a text is split on whitespace and each distinct chunk is
    tokenized once and memoised, like spaCy's own cache, so a corpus costs one dictionary look-up per chunk.
    """

    MAX_CACHE: ClassVar[int] = 500_000

    def __init__(self) -> None:
        # Empty pieces (the doubled space in spaCy's quote list) are skipped, as spaCy's compile_*_regex do.
        self._prefix = regex.compile("|".join("^" + p for p in _PREFIXES if p.strip())).search
        self._suffix = regex.compile("|".join(p + "$" for p in _SUFFIXES if p.strip())).search
        self._infixes = regex.compile("|".join(p for p in _INFIXES if p.strip())).finditer
        self._url = regex.compile(_URL).match
        self.specials = _special_cases()
        # spaCy also merges a special case back when the affix rules had cut it into pieces inside a chunk
        # (``foo):`` ends in the emoticon ``):``): the pieces each such special case is cut into, mapped back to it.
        self._cut_specials: dict[tuple[str, ...], str] = {}
        for key in self.specials:
            if self._prefix(key) or self._suffix(key) or next(self._infixes(key), None):
                pieces = tuple(self._affix_split(key, specials=False))
                if len(pieces) > 1:
                    self._cut_specials[pieces] = key
        self._max_cut = max(len(p) for p in self._cut_specials)
        self._cut_firsts = frozenset(p[0] for p in self._cut_specials)
        self._cache = _Memo(self._tokenize)

    def chunk(self, chunk: str) -> tuple[str, ...]:
        """The tokens of one whitespace-free chunk."""
        if len(self._cache) >= self.MAX_CACHE:
            self._cache.clear()
        return self._cache[chunk]

    def words(self, text: str) -> list[str]:
        """Every token of ``text`` in order (datatrove's ``split_into_words``)."""
        if len(self._cache) >= self.MAX_CACHE:
            self._cache.clear()
        return list(chain.from_iterable(map(self._cache.__getitem__, text.split())))

    def _tokenize(self, chunk: str) -> tuple[str, ...]:
        special = self.specials.get(chunk)
        if special is not None:
            return special
        if chunk.isalpha():  # letters alone are never cut (no affix, infix or URL is made of letters only)
            return (chunk,)
        word = chunk[:-1]
        if word.isalpha():
            # A word and one more character ("word,", "word."): at most that character is cut off as a suffix, and
            # the word may be a special case ("cannot,").
            if not self._suffix_len(chunk):
                return (chunk,)
            tokens = [*self.specials.get(word, (word,)), chunk[-1]]
            return tuple(self._merge_specials(tokens)) if tokens[0] in self._cut_firsts else tuple(tokens)
        tokens = self._affix_split(chunk, specials=True)
        if len(tokens) > 1:
            tokens = self._merge_specials(tokens)
        # A token made only of characters str.strip() removes cannot occur (chunks hold no whitespace).
        return tuple(tokens)

    def _prefix_len(self, s: str) -> int:
        # Most chunks start with an ASCII letter or digit, which begins no prefix but US$, C$ and A$: skip the regex.
        if s[0] in _ASCII_ALNUM and not s.startswith(("US$", "C$", "A$")):
            return 0
        m = self._prefix(s)
        return m.end() - m.start() if m else 0

    def _suffix_len(self, s: str) -> int:
        if not s:
            return 0
        # An ASCII letter or digit ends no suffix but a unit after a digit ("10km") or "'s": skip the regex otherwise.
        if s[-1] in _ASCII_ALNUM and not (s[-1] in "sS" and s[-2:-1] in ("'", "’")) and not _DIGIT.search(s[-6:-1]):
            return 0
        if s.endswith(".."):  # a run of dots is the longest suffix there is
            return len(s) - len(s.rstrip("."))
        # Every other suffix is at most 5 characters long ("اكواب"); look-behinds still see before ``pos``.
        m = self._suffix(s, max(0, len(s) - 5))
        return m.end() - m.start() if m else 0

    def _affix_split(self, s: str, specials: bool) -> list[str]:
        """``Tokenizer._split_affixes`` then ``_attach_tokens`` of spacy/tokenizer.pyx, step for step."""
        table = self.specials if specials else {}
        prefixes: list[str] = []
        suffixes: list[str] = []
        last = -1
        while s and len(s) != last:
            if s in table:
                break
            last = len(s)
            pre = self._prefix_len(s)
            if pre and s[pre:] and s[pre:] in table:
                prefixes.append(s[:pre])
                s = s[pre:]
                break
            suf = self._suffix_len(s[pre:])
            if suf and s[:-suf] and s[:-suf] in table:
                suffixes.append(s[-suf:])
                s = s[:-suf]
                break
            if pre and suf and pre + suf <= len(s):
                prefixes.append(s[:pre])
                suffixes.append(s[-suf:])
                s = s[pre:-suf]
            elif pre:
                prefixes.append(s[:pre])
                s = s[pre:]
            elif suf:
                suffixes.append(s[-suf:])
                s = s[:-suf]
        out = prefixes
        if s:
            if s in table:
                out.extend(table[s])
            elif "." in s and self._url(s):  # a URL has a dot (host name or IP address)
                out.append(s)
            else:
                start = 0
                for m in self._infixes(s):
                    a, b = m.span()
                    if a == 0:
                        continue
                    if a != start:
                        out.append(s[start:a])
                    if a != b:
                        out.append(s[a:b])
                    start = b
                if s[start:]:
                    out.append(s[start:])
        out.extend(reversed(suffixes))
        return out

    def _merge_specials(self, tokens: list[str]) -> list[str]:
        """spaCy's special-case matcher inside one chunk: longest matches first, then the earlier one."""
        n = len(tokens)
        found = [(j - i, i, j) for i in range(n - 1) if tokens[i] in self._cut_firsts
                 for j in range(i + 2, min(n, i + self._max_cut) + 1) if tuple(tokens[i:j]) in self._cut_specials]
        if not found:
            return tokens
        seen: set[int] = set()
        keep = []
        for _, _, i, j in sorted(((ln, -i, i, j) for ln, i, j in found), reverse=True):
            if i not in seen and j - 1 not in seen:
                keep.append((i, j))
            seen.update(range(i, j))
        out: list[str] = []
        pos = 0
        for i, j in sorted(keep):
            out.extend(tokens[pos:i])
            out.extend(self.specials["".join(tokens[i:j])])
            pos = j
        out.extend(tokens[pos:])
        return out


_WORDS: _EnglishWords | None = None


def _english_words() -> _EnglishWords:
    """One tokenizer (and one cache) per worker process, shared by the three steps."""
    global _WORDS
    if _WORDS is None:
        _WORDS = _EnglishWords()
    return _WORDS


# datatrove.utils.text.PUNCTUATION_SET: a word made only of these is a "symbol", not a word, for Gopher's counts.
_DT_PUNCTUATION = frozenset(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, [*range(0, 9), *range(11, 13), *range(13, 32), *range(127, 160)]))
    # datatrove's TERMINAL_PUNCTUATION, the sentence-ending marks of every script.
    + "᪩？⁈𑩂．꩞𑅃﹗𑂾\u1b7d፧𑅂꡶꘎⁉࠾᪨𑊩𑱂᱿𖩮᥅\U00011f43\U00011f44﹒𑈹𑈸።܂؞꛳\U00010f88𑗍𐩖𑙂\u061d꩟᠉\u1b7e𑗗᰼𑻸؟𑪜꧉𑗉𐽙"
    "𖫵𖬷܀꓿᜵𑗏𑁇𑗓𑥄៖𑥆𑗑𑗒꯫۔𐩗\U00010f86꡷\u2e54｡៕߹⸮.𑇅࠹𛲟꫰꤯𐽗᭞𑜼፨𑃁꣏𑇟𖬸𑪛𑜾࠷𝪈?𑃀𑗃！։꣎॥𑗖᭛᠃!၊𖺘⁇𑗌𑑋𖭄᭟𑅁𑙁⸼꩝𑗋"
    "。꧈꫱𑜽𐽖𑂿᙮។꛷\U00010f89៚᥄𑗕𑗎᪪᭚࠽𑇞𑗊𐽘\u2e53𑗔𖩯𑇍𑻷𐽕𑩃।𑗂𑇆𑁈။᱾𑱁꘏܁᜶‼𑈻‽᪫﹖𑑌𑈼\U00010f87𑗐៙᰻"
)


# ------------------------------------------------------------------------------------------------ gopher_quality
@dataclass(frozen=True)
class GopherQualityConfig:
    """Thresholds of Gopher's quality rules (Rae et al. 2021, appendix A.1.1); 0 or None switches a rule off."""

    min_doc_words: int | None = 50
    """Fewest words (tokens with a character that is not punctuation) a document may have."""
    max_doc_words: int | None = 100_000
    """Most words a document may have."""
    min_avg_word_length: float | None = 3
    """Smallest mean word length (characters)."""
    max_avg_word_length: float | None = 10
    """Largest mean word length (characters)."""
    max_symbol_word_ratio: float | None = 0.1
    """Largest count of ``#``, and separately of ellipses (``...``, ``…``), per token."""
    max_bullet_lines_ratio: float | None = 0.9
    """Largest fraction of lines starting with a bullet (``•`` or ``-``)."""
    max_ellipsis_lines_ratio: float | None = 0.3
    """Largest fraction of lines ending with an ellipsis."""
    min_alpha_words_ratio: float | None = 0.8
    """Smallest fraction of tokens holding an alphabetic character (datatrove's ``max_non_alpha_words_ratio``)."""
    min_stop_words: int | None = 2
    """Fewest distinct stop words a document must contain."""
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
    """The stop words (matched case-sensitively against whole tokens, as datatrove does)."""

    def check(self) -> None:
        if len(set(self.stop_words)) > 63:  # one bit each in an int64
            raise ValueError("at most 63 stop words")


# Lines as str.splitlines() cuts them; one regex pass each instead of a Python loop over lines. A bullet line is one
# whose first non-blank character is "•" or "-"; an ellipsis line ends (before trailing blanks) in "..." or "…".
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_BULLET_LINE = re.compile(rf"(?:^|(?<=[{_LINE_BREAKS}]))[^\S{_LINE_BREAKS}]*[•-]")
_ELLIPSIS_LINE = re.compile(rf"(?:\.\.\.|…)[^\S{_LINE_BREAKS}]*(?:(?=[{_LINE_BREAKS}])|\Z)")


class _ChunkRows(dict):
    """Chunk -> row of a numpy table of its Gopher counts, filled on first sight (``__missing__``).

    Looking chunks up with ``map(rows.__getitem__, chunks)`` keeps the per-chunk work in C; the counts of a
    document are then one fancy-indexed sum.
    """

    COLUMNS = 5
    """tokens, words (tokens with a non-punctuation character), characters of words, tokens with a letter,
    stop-word bits."""

    def __init__(self, words: _EnglishWords, stop_bits: dict[str, int]):
        super().__init__()
        self._words = words
        self._stop_bits = stop_bits
        self.table = np.zeros((1024, self.COLUMNS), dtype=np.int64)

    def __missing__(self, chunk: str) -> int:
        row = len(self)
        if row == len(self.table):
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        if chunk.isalpha() and chunk not in self._words.specials:  # one plain word: the common case
            self.table[row] = (1, 1, len(chunk), 1, self._stop_bits.get(chunk, 0))
        else:
            tokens = self._words.chunk(chunk)
            words = [t for t in tokens if not _DT_PUNCTUATION.issuperset(t)]
            bits = 0
            for t in tokens:
                bits |= self._stop_bits.get(t, 0)
            self.table[row] = (len(tokens), len(words), sum(map(len, words)),
                               sum(1 for t in tokens if any(ch.isalpha() for ch in t)), bits)
        self[chunk] = row
        return row


@register
class GopherQuality(DocumentStep):
    """Drop documents failing Gopher's quality heuristics, as datatrove's ``GopherQualityFilter`` decides them.

    Drop reasons are datatrove's: ``gopher_short_doc``, ``gopher_long_doc``, ``gopher_below_avg_threshold``,
    ``gopher_above_avg_threshold``, ``gopher_too_many_hashes``, ``gopher_too_many_ellipsis``,
    ``gopher_too_many_bullets``, ``gopher_too_many_end_ellipsis``, ``gopher_below_alpha_threshold``,
    ``gopher_enough_stop_words`` (too few stop words, despite the name).
    """

    name = "gopher_quality"
    config_cls = GopherQualityConfig

    def setup(self) -> None:
        self._words = _english_words()
        self._stop_bits = {w: 1 << i for i, w in enumerate(dict.fromkeys(self.config.stop_words))}
        self._rows = _ChunkRows(self._words, self._stop_bits)

    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        c = self.config
        text = doc.text
        if len(self._rows) >= _EnglishWords.MAX_CACHE:
            self._rows = _ChunkRows(self._words, self._stop_bits)
        rows = np.fromiter(map(self._rows.__getitem__, text.split()), dtype=np.int64)
        table = self._rows.table[rows]
        n_tokens, n_words, word_chars, n_alpha = (int(x) for x in table[:, :4].sum(axis=0))
        stop_bits = int(np.bitwise_or.reduce(table[:, 4])) if len(rows) else 0

        if c.min_doc_words and n_words < c.min_doc_words:
            return Drop("gopher_short_doc", f"{n_words} words < {c.min_doc_words}")
        if c.max_doc_words and n_words > c.max_doc_words:
            return Drop("gopher_long_doc", f"{n_words} words > {c.max_doc_words}")
        if n_words == 0:  # only reachable with min_doc_words off; datatrove would divide by zero
            return Drop("gopher_short_doc", "no words")
        mean = word_chars / n_words
        if c.min_avg_word_length and mean < c.min_avg_word_length:
            return Drop("gopher_below_avg_threshold", f"mean word length {mean:.2f} < {c.min_avg_word_length}")
        if c.max_avg_word_length and mean > c.max_avg_word_length:
            return Drop("gopher_above_avg_threshold", f"mean word length {mean:.2f} > {c.max_avg_word_length}")
        if c.max_symbol_word_ratio:
            ratio = text.count("#") / n_tokens
            if ratio > c.max_symbol_word_ratio:
                return Drop("gopher_too_many_hashes", f"{ratio:.3f} '#' per word > {c.max_symbol_word_ratio}")
            ratio = (text.count("...") + text.count("…")) / n_tokens
            if ratio > c.max_symbol_word_ratio:
                return Drop("gopher_too_many_ellipsis", f"{ratio:.3f} ellipses per word > {c.max_symbol_word_ratio}")
        n_lines = len(text.splitlines())
        if c.max_bullet_lines_ratio:
            ratio = len(_BULLET_LINE.findall(text)) / n_lines
            if ratio > c.max_bullet_lines_ratio:
                return Drop("gopher_too_many_bullets", f"{ratio:.3f} of lines are bullets > {c.max_bullet_lines_ratio}")
        if c.max_ellipsis_lines_ratio:
            ratio = len(_ELLIPSIS_LINE.findall(text)) / n_lines
            if ratio > c.max_ellipsis_lines_ratio:
                return Drop("gopher_too_many_end_ellipsis",
                            f"{ratio:.3f} of lines end with an ellipsis > {c.max_ellipsis_lines_ratio}")
        if c.min_alpha_words_ratio:
            ratio = n_alpha / n_tokens
            if ratio < c.min_alpha_words_ratio:
                return Drop("gopher_below_alpha_threshold",
                            f"{ratio:.3f} of words have a letter < {c.min_alpha_words_ratio}")
        if c.min_stop_words:
            found = stop_bits.bit_count()
            if found < c.min_stop_words:
                return Drop("gopher_enough_stop_words", f"{found} stop words < {c.min_stop_words}")
        return doc


# --------------------------------------------------------------------------------------------- gopher_repetition
@dataclass(frozen=True)
class GopherRepetitionConfig:
    """Thresholds of Gopher's repetition rules (Rae et al. 2021, table A1); None switches a rule off."""

    dup_line_frac: float | None = 0.3
    """Largest fraction of lines that repeat an earlier line."""
    dup_para_frac: float | None = 0.3
    """Largest fraction of paragraphs (blocks separated by blank lines) that repeat an earlier one."""
    dup_line_char_frac: float | None = 0.2
    """Largest fraction of the document's characters in repeated lines."""
    dup_para_char_frac: float | None = 0.2
    """Largest fraction of the document's characters in repeated paragraphs."""
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    """(n, fraction): the most frequent word n-gram may cover at most this fraction of the characters."""
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    """(n, fraction): word n-grams seen before may cover at most this fraction of the characters."""

    def check(self) -> None:
        for n, _ in (*self.top_n_grams, *self.dup_n_grams):
            if n < 1:
                raise ValueError(f"n-gram sizes must be >= 1, got {n}")


_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAK = re.compile(r"\n+")


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """(count, characters) of the parts equal to an earlier part (datatrove's ``find_duplicates``): all parts but
    the first copy of each."""
    unique = set(parts)
    return len(parts) - len(unique), sum(map(len, parts)) - sum(map(len, unique))


def _word_ids(words: list[str]) -> np.ndarray:
    """Integer ids of ``words`` (equal words, equal ids: the position of the first copy), mapped in C; made dense
    when there are so many that four of them would not pack into an int64."""
    first: dict[str, int] = {}
    ids = np.fromiter(map(first.setdefault, words, range(len(words))), dtype=np.int64, count=len(words))
    if len(words) > 40_000:
        ids = np.unique(ids, return_inverse=True)[1].astype(np.int64)
    return ids


def _top_ngram_chars(words: list[str], ids: np.ndarray, n: int) -> tuple[int, int, int]:
    """(characters, count, first position) of the most frequent word n-gram, datatrove's ``find_top_duplicate``.

    Its n-grams are the words joined by spaces, counted with a Counter whose ``most_common(1)`` returns the first
    n-gram reaching the top count: here n-grams are packed into one integer each and counted with numpy.
    """
    m = len(ids) - n + 1
    vocab = int(ids.max()) + 1 if len(ids) else 1
    if m <= 0:
        return 0, 0, 0
    if vocab ** n >= 2 ** 63:  # too many distinct words to pack n of them in an int64: count the tuples
        counts = Counter(zip(*(words[i:] for i in range(n))))
        gram, k = counts.most_common(1)[0]
        pos = next(i for i in range(m) if tuple(words[i:i + n]) == gram)
    else:
        key = ids[:m].copy()
        for i in range(1, n):
            key = key * vocab + ids[i:i + m]
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
        k = int(counts.max())
        pos = int(first[counts == k].min())
    return (sum(map(len, words[pos:pos + n])) + n - 1) * k, k, pos


class _JoinedNgrams:
    """Word n-grams of a document compared as their words joined without a space (datatrove's ``find_all_duplicate``).

    Joining every n-gram into a string for n = 5..10 dominates the cost of the repetition rules. Instead each
    n-gram is a slice ``[start, end)`` of the concatenated words, identified by a polynomial hash of its characters
    (prefix sums modulo 2**64, in numpy). Equal strings always get equal hashes, so a position whose hash was not
    seen before certainly starts a new n-gram; the few positions whose hash was seen are compared as strings.
    """

    _BASE = 0x100000001B3  # odd, hence invertible modulo 2**64
    _BASE_INVERSE = pow(_BASE, -1, 2**64)
    _powers = np.ones(1, dtype=np.uint64)
    """BASE**k and BASE**-k modulo 2**64 for k < len, shared by all documents and grown on demand."""
    _inverse_powers = np.ones(1, dtype=np.uint64)

    @classmethod
    def _grow_powers(cls, size: int) -> None:
        if len(cls._powers) <= size:
            n = max(size + 1, 2 * len(cls._powers))
            # cumprod over uint64 wraps modulo 2**64, as intended
            cls._powers = np.cumprod(np.r_[np.uint64(1), np.full(n - 1, cls._BASE, dtype=np.uint64)])
            cls._inverse_powers = np.cumprod(np.r_[np.uint64(1), np.full(n - 1, cls._BASE_INVERSE, dtype=np.uint64)])

    def __init__(self, words: list[str]):
        self.text = "".join(words)
        codes = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        size = len(codes)
        self.offsets = np.zeros(len(words) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))
        self.offset_list = self.offsets.tolist()
        self._grow_powers(size)
        self.inverse_powers = self._inverse_powers
        self.prefix = np.zeros(size + 1, dtype=np.uint64)
        self.prefix[1:] = np.cumsum(codes * self._powers[:size])

    def repeated_chars(self, n: int, size: int, frac: float | None = None) -> int:
        """Characters counted by datatrove's left-to-right scan of n-grams.

        The scan adds each n-gram it passes to a set; on an n-gram already in the set it counts its characters and
        jumps n words ahead (the positions jumped over are never added). With ``frac``, only whether the count
        exceeds ``frac`` of ``size`` is wanted: the scan stops as soon as it does, and is skipped when even every
        character of every repeatable n-gram could not (the count returned is then that bound).
        """
        m = len(self.offsets) - n
        if m <= 0:
            return 0
        start, end = self.offsets[:m], self.offsets[n:]
        key = (self.prefix[end] - self.prefix[start]) * self.inverse_powers[start]
        key = key * np.uint64(self._BASE) + (end - start).astype(np.uint64)  # and the length
        # The first position holding each hash, for every position.
        order = np.argsort(key)
        sorted_key = key[order]
        new_group = np.empty(m, dtype=bool)
        new_group[0] = True
        np.not_equal(sorted_key[1:], sorted_key[:-1], out=new_group[1:])
        first_of_group = np.minimum.reduceat(order, np.flatnonzero(new_group))
        first = np.empty(m, dtype=np.int64)
        first[order] = first_of_group[np.cumsum(new_group) - 1]
        seen_before = np.flatnonzero(first != np.arange(m))  # positions whose hash occurred earlier
        if not len(seen_before):
            return 0
        if frac is not None:
            # Counted n-grams never overlap (the scan jumps past each): their characters are at most those of
            # the union of the candidates' spans.
            a, b = start[seen_before], end[seen_before]
            bound = int(np.minimum(b[:-1], a[1:]).sum() - a[:-1].sum() + b[-1] - a[-1])
            if not bound / size > frac:
                return bound
        text, offsets = self.text, self.offset_list
        repeated = idx = 0
        not_added: set[int] = set()
        for c, f in zip(seen_before.tolist(), first[seen_before].tolist()):
            if c < idx:
                continue  # jumped over
            # Every position from idx to c - 1 was passed and added (each was a first occurrence). Was the same
            # string added before? Mostly at the hash's first position; else (that one jumped over, or a hash
            # collision) at another earlier position with the same hash.
            gram = text[offsets[c]:offsets[c + n]]
            if f not in not_added and text[offsets[f]:offsets[f + n]] == gram:
                hit = True
            else:
                hit = any(j not in not_added and text[offsets[j]:offsets[j + n]] == gram
                          for j in (np.flatnonzero(key[f + 1:c] == key[c]) + f + 1).tolist())
            if hit:
                repeated += len(gram)
                not_added.update(range(c, c + n))
                idx = c + n
                if frac is not None and repeated / size > frac:
                    break
            else:
                idx = c + 1
        return repeated


@register
class GopherRepetition(DocumentStep):
    """Drop documents that repeat themselves, as datatrove's ``GopherRepetitionFilter`` decides them.

    Drop reasons are datatrove's: ``empty``, ``dup_para_frac``, ``dup_para_char_frac``, ``dup_line_frac``,
    ``dup_line_char_frac``, ``top_{n}_gram``, ``duplicated_{n}_n_grams``.
    """

    name = "gopher_repetition"
    config_cls = GopherRepetitionConfig

    def setup(self) -> None:
        self._words = _english_words()

    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        c = self.config
        text = doc.text
        if not text:
            return Drop("empty")
        size = len(text)
        paragraphs = _PARAGRAPH_BREAK.split(text.strip())
        dup, chars = _duplicates(paragraphs)
        if c.dup_para_frac and dup / len(paragraphs) > c.dup_para_frac:
            return Drop("dup_para_frac", f"{dup}/{len(paragraphs)} paragraphs repeat")
        if c.dup_para_char_frac and chars / size > c.dup_para_char_frac:
            return Drop("dup_para_char_frac", f"{chars}/{size} characters in repeated paragraphs")
        lines = _LINE_BREAK.split(text)
        dup, chars = _duplicates(lines)
        if c.dup_line_frac and dup / len(lines) > c.dup_line_frac:
            return Drop("dup_line_frac", f"{dup}/{len(lines)} lines repeat")
        if c.dup_line_char_frac and chars / size > c.dup_line_char_frac:
            return Drop("dup_line_char_frac", f"{chars}/{size} characters in repeated lines")

        words = self._words.words(text)
        ids = _word_ids(words)
        for n, frac in c.top_n_grams:
            chars, k, pos = _top_ngram_chars(words, ids, n)
            if chars / size > frac:
                return Drop(f"top_{n}_gram", f"{' '.join(words[pos:pos + n])!r} x{k}")
        joined = _JoinedNgrams(words) if c.dup_n_grams else None
        for n, frac in c.dup_n_grams:
            chars = joined.repeated_chars(n, size, frac)
            if chars / size > frac:
                return Drop(f"duplicated_{n}_n_grams", f"{chars}/{size} characters in repeated {n}-grams")
        return doc


# ------------------------------------------------------------------------------------------------------------ c4
@dataclass(frozen=True)
class C4Config:
    """The C4 rules (Raffel et al. 2020, section 2.2) as datatrove's ``C4QualityFilter`` applies them, line by line."""

    remove_citations: bool = True
    """Delete Wikipedia-style citation marks (``[1]``, ``[edit]``, ``[citation needed]``) from lines."""
    filter_no_terminal_punct: bool = True
    """Remove lines not ending in ``.``, ``?``, ``!``, ``"`` or ``'`` (or ending in ``...``)."""
    min_num_sentences: int | None = 5
    """Drop documents with fewer sentences than this in the lines kept (None: no minimum)."""
    min_words_per_line: int | None = 3
    """Remove lines with fewer whitespace-separated words (None: no minimum)."""
    max_word_length: int | None = 1000
    """Remove lines holding a word longer than this many characters (None: no limit)."""
    filter_lorem_ipsum: bool = True
    """Drop documents with a kept line containing "lorem ipsum"."""
    filter_javascript: bool = True
    """Remove lines mentioning "javascript"."""
    filter_curly_bracket: bool = True
    """Drop documents with a kept line containing ``{`` (code, mostly)."""
    filter_policy: bool = True
    """Remove lines about terms of use, privacy or cookie policies."""


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# spaCy's Sentencizer.default_punct_chars: a sentence ends after one of these tokens.
_SENTENCE_END = frozenset(
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？𐩖𐩗𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌"
    "𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑩂𑩃𑪛𑪜𑱁𑱂𖩮𖩯𖫵𖬷𖬸𖭄𛲟𝪈｡。"
)
_WHITESPACE_RUNS = re.compile(r"(\s+)")


def _is_punct(token: str) -> bool:
    """spaCy's ``is_punct``: every character is Unicode punctuation (category P*)."""
    return all(unicodedata.category(ch)[0] == "P" for ch in token)


def _sentencizer_chunk(tokens: tuple[str, ...]) -> tuple[int, bool, int, bool]:
    """spaCy's sentencizer run over one chunk's tokens, for both states it may enter in.

    The sentencizer starts a sentence at the first ordinary token after a sentence-ending one. Returns (sentence
    starts, still after an end) when entering after an ordinary token, then the same when entering after an end.
    """
    out: list[int | bool] = []
    for seen in (False, True):
        starts = 0
        for t in tokens:
            ends = t in _SENTENCE_END
            if seen and not ends and not _is_punct(t):
                starts += 1
                seen = False
            elif ends:
                seen = True
        out += [starts, seen]
    return out[0], out[1], out[2], out[3]


@register
class C4Quality(DocumentStep):
    """Remove lines and drop documents by the C4 rules, as datatrove's ``C4QualityFilter`` does.

    Kept documents are rewritten: each kept line stripped, citations removed, removed lines gone. Drop reasons are
    datatrove's (``lorem_ipsum``, ``curly_bracket``, ``too_few_sentences``); removed lines are counted per rule as
    ``line-filter-too_long_word``, ``line-filter-no_terminal_punc``, ``line-filter-too_few_words``,
    ``line-filter-javascript`` and ``line-filter-policy``. The bad-words rule is a separate concern (C4's list of
    words is not shipped here).
    """

    name = "c4"
    config_cls = C4Config

    def setup(self) -> None:
        self._words = _english_words()
        self._sent: dict[str, tuple[int, bool, int, bool]] = {}

    def _sentences(self, line: str, enough: int) -> int:
        """Sentences spaCy's sentencizer finds in ``line`` (at least 1), counting no further than ``enough``."""
        n = 1
        seen = False
        for i, part in enumerate(_WHITESPACE_RUNS.split(line)):
            if i % 2:
                # spaCy turns a whitespace run other than one plain space into a token of its own, which counts as
                # an ordinary token for the sentencizer.
                if part != " " and seen:
                    n += 1
                    seen = False
                continue
            if not part:
                continue
            got = self._sent.get(part)
            if got is None:
                if len(self._sent) >= _EnglishWords.MAX_CACHE:
                    self._sent.clear()
                got = self._sent[part] = _sentencizer_chunk(self._words.chunk(part))
            starts, seen = (got[2], got[3]) if seen else (got[0], got[1])
            n += starts
            if n >= enough:
                break
        return n

    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        c = self.config
        need = c.min_num_sentences or 0
        sentences = 0
        kept: list[str] = []
        for line in doc.text.splitlines():
            line = line.strip()
            words = line.split()
            if c.max_word_length is not None and words and max(map(len, words)) > c.max_word_length:
                stats.count("line-filter-too_long_word")
                continue
            if c.remove_citations:
                line = _CITATION.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
                stats.count("line-filter-no_terminal_punc")
                continue
            if c.min_words_per_line is not None and len(words) < c.min_words_per_line:
                stats.count("line-filter-too_few_words")
                continue
            lower = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in lower:
                return Drop("lorem_ipsum", line)
            if c.filter_javascript and "javascript" in lower:
                stats.count("line-filter-javascript")
                continue
            if c.filter_curly_bracket and "{" in line:
                return Drop("curly_bracket", line)
            if c.filter_policy and any(p in lower for p in _POLICY):
                stats.count("line-filter-policy")
                continue
            if sentences < need:
                sentences += self._sentences(line, need - sentences)
            kept.append(line)
        if sentences < need:
            return Drop("too_few_sentences", f"{sentences} sentences < {need}")
        doc.text = "\n".join(kept).strip()
        return doc
