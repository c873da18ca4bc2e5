"""Licence detection: which licences a document's text carries, checked against the licence it is declared under.

A document can carry a licence three ways, all recognised here and reported as SPDX identifiers:

- an ``SPDX-License-Identifier:`` line (REUSE / SPDX 2.3 annex E), parsed as an SPDX expression;
- a licence's full text, recognised by its title and a phrase of its body (``GNU GENERAL PUBLIC LICENSE Version 3,
  29 June 2007`` and ``TERMS AND CONDITIONS``), or for short permissive texts by their distinctive grant or condition
  (MIT's "Permission is hereby granted, free of charge, to any person obtaining a copy", the BSD clauses, ISC, 0BSD,
  zlib, the Unlicense);
- a licence notice: "under the terms of the GNU General Public License as published by the Free Software Foundation;
  either version 2 of the License, or (at your option) any later version" (GPL-2.0-or-later; without the "or later"
  clause ``-only``), "License GPLv3+", "Licensed under the Apache License, Version 2.0", "Mozilla Public License, v.
  2.0", "Creative Commons Attribution-ShareAlike 4.0", in English, and for the GNU notices also German, French and
  Spanish, the languages of translated manual pages.

This follows the approach of ScanCode toolkit's licence rules (exact phrases of licence texts and notices), with a
few dozen distinctive phrases of the licences above written as regular expressions, rather than depending on the
toolkit itself and its index of tens of thousands of rules, heavy for a step that runs on every document. Phrases
are matched on the lowercased text word by word, any run of spaces, punctuation, line breaks and comment markers
between words, so wrapped and commented copies (``# under the terms of ...``) match too. Each rule first checks that
the document contains one of its words (a substring test), so a document without licence words costs a few
substring tests: 5 to 19 MB/s on the demo corpus, one core (translated man pages, each with a notice, the slowest).

A full licence text mentions other licences (the MPL-2.0 names the GNU GPL version 2.0 as a secondary licence, the
GPL-3.0 text ends with a GPL-3.0-or-later notice for programs to copy): notices inside the extent of a recognised full
text (its canonical length after its title) belong to that text and are not reported on their own. A passing
mention ("license is a license string, which must be GPL compatible", "print the version number, license, and
disclaimer of warranty", "License: Apache 2.0" in the metadata of a package shown as an example) is not a notice.

The declared licence is the document's own ``meta["license"]`` or else the dataset's declared licence. It must be a
valid SPDX expression (``license-expression``'s SPDX licensing; ``LicenseRef-`` identifiers and the ``+`` suffix are
valid per the SPDX specification): otherwise the document counts as ``license_unknown_declared`` and is not checked.
A detected licence conflicts when the declared expression names no licence of the same family, versions compared
without their ``-only`` / ``-or-later`` / ``+`` suffix: the GPL-3.0 text in a document declared GPL-3.0-or-later is
no conflict, a GPL-2.0-or-later notice in it is (the German man pages of the demo corpus are translations under
GPL-3.0-or-later of originals such as ``e2scrub(8)``, "Lizenz ist GPLv2+": reported, not judged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ....errors import DataError
from ..base import Doc, DocumentStep, Drop, StepStats, register


def _p(phrase: str) -> str:
    """A phrase as a regex over lowercased text: its words in order, any run of non-word characters between them."""
    return r"\W+".join(re.escape(w) for w in re.findall(r"\w+", phrase.lower()))


@dataclass(frozen=True)
class _TextRule:
    """A licence recognised by phrases: ``first`` (its title or grant) and every one of ``also``."""

    spdx: str
    key: str
    """A word every match contains: the rule runs only on documents that contain it (a substring test is many times
    faster than a regex scan, and most documents contain none of the keys)."""
    first: re.Pattern
    also: tuple[re.Pattern, ...] = ()
    extent: int = 0
    """Characters after ``first`` that the full text covers (its canonical length plus a tenth), where ``also`` is
    looked for and where notices are part of the text. 0 for a notice or a short grant: ``also`` anywhere."""


def _text(spdx: str, key: str, first: str, *also: str, extent: int = 0) -> _TextRule:
    return _TextRule(spdx, key, re.compile(first), tuple(re.compile(a) for a in also), extent)


_GNU_TERMS = _p("TERMS AND CONDITIONS")
_GFDL_BODY = _p("APPLICABILITY AND DEFINITIONS")
_PSF = r"psf\W+license\W+agreement\W+for\W+python|python\W+software\W+foundation\W+license\W+version\W+2"
_GRANT_ANY_PURPOSE = (r"permission\W+to\W+use\W+copy\W+modify\W+and(?:\W+or)?\W+distribute\W+this\W+software\W+for\W+"
                      r"any\W+purpose\W+with\W+or\W+without\W+fee\W+is\W+hereby\W+granted")

TEXT_RULES: tuple[_TextRule, ...] = (
    # Full texts: title (with its version and date, which passing mentions lack) and a phrase of the body.
    _text("Apache-2.0", "apache", _p("Apache License Version 2.0, January 2004"),
          _p("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION"), extent=12_500),
    _text("GPL-1.0-only", "1989", _p("GNU GENERAL PUBLIC LICENSE Version 1, February 1989"), _GNU_TERMS,
          extent=14_000),
    _text("GPL-2.0-only", "1991", _p("GNU GENERAL PUBLIC LICENSE Version 2, June 1991"), _GNU_TERMS, extent=20_000),
    _text("GPL-3.0-only", "2007", _p("GNU GENERAL PUBLIC LICENSE Version 3, 29 June 2007"), _GNU_TERMS,
          extent=38_500),
    _text("LGPL-2.0-only", "1991", _p("GNU LIBRARY GENERAL PUBLIC LICENSE Version 2, June 1991"), _GNU_TERMS,
          extent=28_000),
    _text("LGPL-2.1-only", "1999", _p("GNU LESSER GENERAL PUBLIC LICENSE Version 2.1, February 1999"), _GNU_TERMS,
          extent=29_000),
    _text("LGPL-3.0-only", "2007", _p("GNU LESSER GENERAL PUBLIC LICENSE Version 3, 29 June 2007"),
          _p("Additional Definitions"), extent=8_500),
    _text("AGPL-3.0-only", "2007", _p("GNU AFFERO GENERAL PUBLIC LICENSE Version 3, 19 November 2007"), _GNU_TERMS,
          extent=37_500),
    _text("GFDL-1.1-only", "2000", _p("GNU Free Documentation License Version 1.1, March 2000"), _GFDL_BODY,
          extent=20_000),
    _text("GFDL-1.2-only", "2002", _p("GNU Free Documentation License Version 1.2, November 2002"), _GFDL_BODY,
          extent=22_500),
    _text("GFDL-1.3-only", "2008", _p("GNU Free Documentation License Version 1.3, 3 November 2008"), _GFDL_BODY,
          extent=25_500),
    _text("MPL-1.1", "mozilla", _p("MOZILLA PUBLIC LICENSE Version 1.1"), _p("1.0.1. Commercial Use means"),
          extent=28_500),
    _text("MPL-2.0", "mozilla", _p("Mozilla Public License Version 2.0"), _p("1.1. Contributor means"),
          extent=18_500),
    _text("CC0-1.0", "cc0", _p("CC0 1.0 Universal"), _p("Statement of Purpose"), extent=7_800),
    _text("Artistic-1.0-Perl", "artistic", r"\"artistic\W+license\"",
          _p("The intent of this document is to state the conditions under which a Package may be copied"),
          extent=6_800),
    _text("Artistic-2.0", "artistic", _p("Artistic License 2.0"), _p("Copyright (c) 2000-2006, The Perl Foundation"),
          extent=10_000),
    _text("Vim", "vim", _p("distributing unmodified copies of Vim except that they must include this license text"),
          extent=5_000),
    _text("PSF-2.0", "python", _PSF, _p("This LICENSE AGREEMENT is between the Python Software Foundation"),
          extent=2_800),
    # Python-2.0 is the whole stack of the PSF, BeOpen, CNRI and CWI agreements (SPDX "Python License 2.0").
    _text("Python-2.0", "beopen", _PSF, _p("BEOPEN PYTHON OPEN SOURCE LICENSE AGREEMENT VERSION 1"),
          _p("CNRI LICENSE AGREEMENT FOR PYTHON 1.6.1")),
    # Short permissive texts: their grant is the whole of what distinguishes them.
    _text("MIT", "hereby", _p("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
                              "software"),
          _p("The above copyright notice and this permission notice shall be included in all copies")),
    _text("ISC", "hereby", _GRANT_ANY_PURPOSE + r"\W+provided\W+that\W+the\W+above\W+copyright\W+notice"),
    _text("0BSD", "hereby", _GRANT_ANY_PURPOSE + r"\W+the\W+software\W+is\W+provided"),
    _text("Zlib", "freely", _p("Permission is granted to anyone to use this software for any purpose, including "
                               "commercial applications, and to alter it and redistribute it freely")),
    _text("Unlicense", "unencumbered", _p("unencumbered software released into the public domain")),
    _text("BSL-1.0", "boost", _p("Boost Software License - Version 1.0")),
    _text("OpenSSL", "openssl", _p("OpenSSL Project for use in the OpenSSL Toolkit")),
    # Notices.
    _text("Apache-2.0", "apache", _p("Licensed under the Apache License, Version 2.0")),
    _text("OPL-1.0", "publication", r"publication\W+licen[cs]e\W+v(?:ersion)?\W*1\W0(?!\w)"),
    _text("CC0-1.0", "creativecommons", re.escape("creativecommons.org/publicdomain/zero/1.0")),
)

# BSD: one preamble, told apart by its clauses (read up to the disclaimer that follows them).
_BSD = re.compile(_p("Redistribution and use in source and binary forms, with or without modification, are "
                     "permitted provided that the following conditions are met"))
_BSD_END = re.compile(r"software\W+is\W+provided")
_BSD_ADVERTISING = re.compile(_p("All advertising materials mentioning features or use of this software must display"))
_BSD_ENDORSE = re.compile(r"neither\W+the\W+name|may\W+not\W+be\W+used\W+to\W+endorse|names?\W+of\W+[\w\W]{0,120}?"
                          r"may\W+(?:not\W+)?be\W+used\W+to\W+endorse")

_MPL = re.compile(r"mozilla\W+public\W+licen[cs]e\W+(?:version\W+|v\W+)?(\d\.\d)(?!\.?\d)")
# Creative Commons by name, by abbreviation and by URL; the parts give the identifier (CC-BY-NC-SA-4.0).
_CC_PARTS = {"noncommercial": "NC", "sharealike": "SA", "noderivatives": "ND", "noderivs": "ND",
             "nc": "NC", "sa": "SA", "nd": "ND"}
_CC = (re.compile(r"creative\W+commons\W+attribution((?:\W+(?:noncommercial|sharealike|noderivatives|noderivs))*)"
                  r"\W+(\d\.\d)(?!\.?\d)"),
       re.compile(r"cc\W+by((?:\W(?:nc|sa|nd))*)\W+(\d\.\d)(?!\.?\d)"),
       re.compile(r"creativecommons\.org/licenses/by((?:-(?:nc|sa|nd))*)/(\d\.\d)"))

# GNU notices: the licence's name, its version near it, and an "or later" clause after the version. Each regex
# starts with a literal word, which the regex engine scans for quickly; the family word before "general public
# license" is read from the few characters before the match.
_GPL_NAME = re.compile(r"general\W+public\W+licen[cs]e")
_GNU_GPL = re.compile(r"gnu\W+(a|l)?gpl(?!\w)")
_FDL_NAME = re.compile(r"free\W+documentation\W+licen[cs]e")
_FAMILY_BEFORE = re.compile(r"(affero|lesser|library)\W+$")
_VERSION_OF = re.compile(r"version\W+(\d(?:\.\d)?)\W+of\W+the\W+(?:gnu\W+)?(?:(affero|lesser|library)\W+)?"
                         r"general\W+public\W+licen[cs]e")
_GPL_ABBR = re.compile(r"gpl(?:-|\s)?v?([123](?:\.[0-3])?)(?:(\+)|(?!\.?\w))")
_FDL_ABBR = re.compile(r"fdl(?:-|\s)?v?(1\.[123])(?:(\+)|(?!\.?\w))")
_ABBR_CONTEXT = re.compile(r"licen[cs]|lizenz|under|unter|sous|bajo|terms")
_VERSION = re.compile(r"\b(?:version\s+|v\.?\s*)(\d(?:\.\d)?)(?!\.?\d)")
_OR_LATER = re.compile(
    r"^\W*\+|or\W+(?:\(?at\W+your\W+option\W+)?any\W+later|or\W+(?:any\W+)?later|or\W+newer"
    r"|oder\W+(?:\(?nach\W+ihrer\W+wahl\W+)?(?:jede[rn]?\W+)?(?:neuer|sp[aä]ter|irgendeine[rn]?\W+sp[aä]ter)"
    r"|ou\W+(?:\(?(?:à|a)\W+votre\W+(?:choix|option)\W+)?(?:toute\W+)?(?:version\W+)?(?:ult[eé]rieure|plus\W+r[eé]cente)"
    r"|o\W+(?:\(?a\W+su\W+elecci[oó]n\W+)?cualquier\W+versi[oó]n\W+posterior")
_BLANK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"[.!?]\s")
_OF_THE_LICENSE = re.compile(r"\W+(?:of\W+the\W+licen[cs]e|der\W+lizenz|de\W+la\W+licence|de\W+la\W+licencia)")

_SPDX_LINE = re.compile(r"spdx-license-identifier:[ \t]*([^\n\r]*)", re.IGNORECASE)
_SPDX_TAIL = re.compile(r"\s*(?:\*/|-->|\*\)|-\}|#\}|%>|\"\"\"|\'\'\').*$")
_TRIGGERS = ("licen", "lizenz", "permission", "redistribut", "unencumbered", "creative", "copyright", "artistic",
             "public", "gpl", "fdl")
"""Words one of which every recognised text or notice contains: a document with none of them stops here."""


def _word_start(text: str, i: int) -> bool:
    """Whether position ``i`` of ``text`` starts a word (what ``\\b`` would test, without slowing the regex scan)."""
    return i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_.-/")


def _window(text: str, start: int, size: int) -> str:
    """``size`` characters of ``text`` from ``start``, stopped at the first blank line (the notice's paragraph)."""
    w = text[start:start + size]
    m = _BLANK.search(w)
    return w[:m.start()] if m else w


class _Spdx:
    """SPDX identifiers and expressions, with ``license-expression``'s SPDX licensing."""

    def __init__(self):
        try:
            from license_expression import ExpressionError, get_spdx_licensing
        except ImportError:
            raise DataError("the license step needs the package license-expression: "
                            "pip install license-expression") from None
        self.licensing = get_spdx_licensing()
        self.errors = (ExpressionError, ValueError, TypeError)
        self.known = {k.lower(): k for k in self.licensing.known_symbols if not k.startswith("LicenseRef-")}

    def canonical(self, key: str) -> str | None:
        """The SPDX id for ``key`` (any case, deprecated ids resolved: GPL-2.0+ -> GPL-2.0-or-later), or None."""
        k = self.known.get(key.lower())
        if k is not None:
            return k
        try:
            sym = self.licensing.parse(key, validate=True)
        except self.errors:
            return None
        return sym.key if isinstance(sym, self.licensing.LicenseSymbol) else None

    def keys(self, expression: str) -> list[str] | None:
        """The licence identifiers of an SPDX expression (exceptions left out), or None if it is not valid SPDX."""
        try:
            parsed = self.licensing.parse(expression, validate=False)
        except self.errors:
            return None
        if parsed is None:
            return None
        out = []
        for sym in self.licensing.license_symbols(parsed):
            if getattr(sym, "is_exception", False):
                continue
            key = sym.key
            if re.match(r"^(?:DocumentRef-[\w.-]+:)?LicenseRef-[\w.-]+$", key):
                out.append(key)
                continue
            base, plus = (key[:-1], "+") if key.endswith("+") else (key, "")
            canon = self.canonical(base)
            if canon is None:
                return None
            out.append(canon + plus)
        return out


def family(spdx_id: str) -> str:
    """The licence without its version qualifier: GPL-2.0-or-later, GPL-2.0-only, GPL-2.0+ -> GPL-2.0."""
    return re.sub(r"(?:-only|-or-later|\+)$", "", spdx_id)


@dataclass(frozen=True)
class LicenseConfig:
    """What to do when a document's text carries a licence its declared licence does not name."""

    action: str = "report"
    """``report``: tag ``meta["license_conflict"]``, count and keep an example, keep the document; ``drop``: drop it
    (reason ``license_conflict``)."""

    def check(self) -> None:
        if self.action not in ("report", "drop"):
            raise ValueError(f"action must be 'report' or 'drop', got {self.action!r}")


@register
class LicenseDetect(DocumentStep):
    """Tag ``meta["license_detected"]`` (SPDX ids) and check it against the declared licence."""

    name = "license"
    config_cls = LicenseConfig

    def setup(self) -> None:
        self.spdx = _Spdx()
        self._declared: dict[str, list[str] | None] = {}
        for rule in TEXT_RULES:
            if self.spdx.canonical(rule.spdx) != rule.spdx:  # a typo here would silently never match a declaration
                raise DataError(f"the license step: {rule.spdx!r} is not an SPDX licence identifier")

    # -------------------------------------------------------------------------------------------- detection
    def detect(self, text: str) -> list[str]:
        """SPDX identifiers of the licences ``text`` carries (sorted, each once)."""
        found: set[str] = set()
        low = text.lower()
        if "spdx-license-identifier" in low:
            for m in _SPDX_LINE.finditer(text):
                found.update(self.spdx.keys(_SPDX_TAIL.sub("", m.group(1)).strip()) or ())
        if not any(w in low for w in _TRIGGERS):
            return sorted(found)
        covered: list[tuple[int, int]] = []  # extents of full texts: notices inside them are the texts' own
        for rule in TEXT_RULES:
            if rule.key not in low:
                continue
            for m in rule.first.finditer(low):
                if rule.extent:
                    end = m.end() + rule.extent
                    ok = all(a.search(low, m.start(), end) for a in rule.also)
                else:
                    ok = all(a.search(low) for a in rule.also)
                if ok:
                    found.add(rule.spdx)
                    if rule.extent:
                        covered.append((m.start(), m.start() + rule.extent))
                    break
        if "redistribution" in low:
            for m in _BSD.finditer(low):
                clauses = low[m.end():m.end() + 2500]
                stop = _BSD_END.search(clauses)
                clauses = clauses[:stop.start()] if stop else clauses
                found.add("BSD-4-Clause" if _BSD_ADVERTISING.search(clauses)
                          else "BSD-3-Clause" if _BSD_ENDORSE.search(clauses) else "BSD-2-Clause")
        if "mozilla" in low:
            for m in _MPL.finditer(low):
                self._add(found, f"MPL-{m.group(1)}")
        if "creative" in low or "cc" in low:
            for rx in _CC:
                for m in rx.finditer(low):
                    if _word_start(low, m.start()):
                        names = "".join(f"-{_CC_PARTS[p]}" for p in re.findall(r"[a-z]+", m.group(1)))
                        self._add(found, f"CC-BY{names}-{m.group(2)}")

        def notice(pos: int) -> bool:
            """A GNU name at ``pos`` is a notice of its own, not words of a recognised full text."""
            return not any(a <= pos < b for a, b in covered)

        if "public" in low:
            for m in _GPL_NAME.finditer(low):
                if notice(m.start()):
                    fam = _FAMILY_BEFORE.search(low, max(0, m.start() - 24), m.start())
                    self._notice(found, low, m.end(), {"affero": "AGPL", "lesser": "LGPL", "library": "LGPL"}.get(
                        fam.group(1) if fam else "", "GPL"))
            for m in _VERSION_OF.finditer(low):
                if notice(m.start()) and _word_start(low, m.start()):
                    name = {"affero": "AGPL", "lesser": "LGPL", "library": "LGPL"}.get(m.group(2) or "", "GPL")
                    later = bool(_OR_LATER.search(_window(low, m.end(), 140)))
                    self._add(found, self._gnu_id(name, m.group(1), later))
        if "documentation" in low:
            for m in _FDL_NAME.finditer(low):
                if notice(m.start()):
                    self._notice(found, low, m.end(), "GFDL")
        if "gpl" in low:
            for m in _GNU_GPL.finditer(low):
                if notice(m.start()):
                    self._notice(found, low, m.end(), {"a": "AGPL", "l": "LGPL"}.get(m.group(1) or "", "GPL"))
            for m in _GPL_ABBR.finditer(low):
                s = m.start()
                fam = low[s - 1] if s and low[s - 1] in "al" else ""
                s -= len(fam)
                if notice(s) and _word_start(low, s) and _ABBR_CONTEXT.search(low, max(0, s - 40), s):
                    later = bool(m.group(2)) or bool(_OR_LATER.search(_window(low, m.end(), 140)))
                    self._add(found, self._gnu_id({"a": "AGPL", "l": "LGPL"}.get(fam, "GPL"), m.group(1), later))
        if "fdl" in low:
            for m in _FDL_ABBR.finditer(low):
                s = m.start() - (1 if m.start() and low[m.start() - 1] == "g" else 0)
                if notice(s) and _word_start(low, s) and _ABBR_CONTEXT.search(low, max(0, s - 40), s):
                    later = bool(m.group(2)) or bool(_OR_LATER.search(_window(low, m.end(), 140)))
                    self._add(found, self._gnu_id("GFDL", m.group(1), later))
        return sorted(found)

    def _notice(self, found: set[str], low: str, end: int, name: str) -> None:
        """A GNU licence named just before ``end``: its version must follow closely, "or later" may follow that."""
        window = _window(low, end, 220)
        v = _VERSION.search(window)
        if v is None:
            return
        # Past the end of the sentence, the version must say it is the licence's ("... die Wahl zwischen der Version
        # 2 der Lizenz oder ...") rather than some program's ("... License. Version 2 of frob adds ...").
        if _SENTENCE_END.search(window, 0, v.start()) and not _OF_THE_LICENSE.match(window, v.end()):
            return
        later = bool(_OR_LATER.search(_window(low, end + v.end(), 140)))
        self._add(found, self._gnu_id(name, v.group(1), later))

    @staticmethod
    def _gnu_id(name: str, ver: str, later: bool) -> str:
        if "." not in ver and name != "GFDL":
            ver += ".0"
        return f"{name}-{ver}-{'or-later' if later else 'only'}"

    def _add(self, found: set[str], spdx_id: str) -> None:
        canon = self.spdx.canonical(spdx_id)
        if canon is not None:  # a version that does not exist (GPL-4, CC-BY-NC-7.0) is no licence
            found.add(canon)

    # -------------------------------------------------------------------------------------------- the step
    def apply(self, doc: Doc, stats: StepStats) -> Doc | Drop:
        detected = self.detect(doc.text)
        if not detected:
            return doc
        doc.meta["license_detected"] = detected
        for d in detected:
            stats.count(f"license:{d}")
        declared = doc.meta.get("license")
        if not isinstance(declared, str) or not declared.strip():
            declared = self.ctx.license
        if not declared:
            return doc
        keys = self._declared.get(declared, False)
        if keys is False:  # parsing an expression costs more than detecting; datasets declare few distinct ones
            keys = self.spdx.keys(declared)
            if len(self._declared) < 4096:
                self._declared[declared] = keys
        if keys is None:
            stats.count("license_unknown_declared")
            return doc
        families = {family(k) for k in keys}
        conflict = [d for d in detected if family(d) not in families]
        if not conflict:
            return doc
        evidence = f"text carries {', '.join(conflict)}; declared {declared}"
        if self.config.action == "drop":
            return Drop("license_conflict", evidence)
        doc.meta["license_conflict"] = conflict
        stats.count("license_conflict")
        stats.example("flagged", doc, "license_conflict", evidence)
        return doc
