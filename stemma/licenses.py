"""Licence obligations along the lineage: what the licences of a version's data and checkpoints require of it.

A licence enters the tree through a dataset (its declared licence, the per-document licences its documents carry,
and the licences the curation ``license`` step detected in their texts) or through an imported master (the import
config's ``license:``, or the checkpoint's README metadata or LICENSE text). It becomes an obligation of the version
trained on it and of every version derived from that one: children, variants, updates, students.

Each licence is an SPDX expression parsed with license-expression; each identifier is classified by ScanCode's
licence database (the index license-expression ships) into the kinds of obligation it carries:

- ``copyleft`` (ScanCode's Copyleft and Copyleft Limited, and Creative Commons ShareAlike): a release must be under
  the same licence family, at a version the source allows (``GPL-3.0-only`` is kept by ``GPL-3.0-or-later`` and
  ``GPL-3.0-only``, ``GPL-2.0-or-later`` by any GPL from 2.0 on), or under a licence the source lets derivatives
  move to (`UPGRADES`);
- ``attribution``: notices a release must carry (the model card and the ML-BOM list them); never a conflict;
- ``non-commercial`` (``-NC-`` licences, PolyForm Noncommercial): the release licence must be non-commercial too;
- ``no-derivatives`` (``-ND-`` licences): only the same licence passes it on;
- ``use-restrictions`` (OpenRAIL, Llama and Gemma terms: ScanCode's Proprietary Free, Free Restricted and
  Source-available): the same licence must be passed on;
- ``review``: an identifier that is not SPDX or that the database does not know: listed, not judged.

A source expression with ``OR`` gives the licensee a choice: the alternative with the fewest obligations is taken.
A release expression with ``OR`` gives the recipient one: every alternative must keep every obligation; ``AND``
keeps an obligation when one of its parts does.

`licensing(ws, version_id)` walks the lineage once and returns one frozen `Licensing`, which the model card, the
ML-BOM, `stemma show`, `stemma tree` and `stemma release` all read.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StemmaError

if TYPE_CHECKING:
    from .workspace import VersionInfo, Workspace

COPYLEFT, ATTRIBUTION, NON_COMMERCIAL, NO_DERIVATIVES, USE_RESTRICTIONS, REVIEW = (
    "copyleft", "attribution", "non-commercial", "no-derivatives", "use-restrictions", "review")
KINDS = (COPYLEFT, ATTRIBUTION, NON_COMMERCIAL, NO_DERIVATIVES, USE_RESTRICTIONS, REVIEW)
_WEIGHT = {ATTRIBUTION: 1, COPYLEFT: 10, USE_RESTRICTIONS: 20, NON_COMMERCIAL: 30, NO_DERIVATIVES: 40, REVIEW: 50}
"""How much a kind restricts, to pick the lightest alternative of a source's ``OR``."""

UPGRADES = {
    "LGPL-2.0": ("GPL-2.0", "GPL-3.0"), "LGPL-2.1": ("GPL-2.0", "GPL-3.0"),  # LGPL-2.1 section 3
    "LGPL-3.0": ("GPL-3.0",),                                               # LGPL-3.0 section 2
    "GPL-3.0": ("AGPL-3.0",),                                               # GPL-3.0 section 13
    "CC-BY-SA-4.0": ("GPL-3.0",),                      # Creative Commons' compatible licence list (2015)
    "MPL-2.0": ("GPL-2.0", "LGPL-2.1", "GPL-3.0", "LGPL-3.0", "AGPL-3.0"),  # MPL-2.0 secondary licences
}
"""Licence family -> families a derivative may be released under instead (versions as the source allows)."""

HF_LICENSES = {
    "llama2": "LicenseRef-scancode-llama-2-license-2023", "llama3.1": "LicenseRef-scancode-llama-3.1-license-2024",
    "llama3.2": "LicenseRef-scancode-llama-3.2-license-2024", "llama3.3": "LicenseRef-scancode-llama-3.3-license-2024",
    "llama4": "LicenseRef-scancode-llama-4-license-2025", "gemma": "LicenseRef-scancode-gemma-tou-2024-04-01",
    "bigscience-openrail-m": "LicenseRef-scancode-bigscience-open-rail-m",
    "bigcode-openrail-m": "LicenseRef-scancode-bigcode-open-rail-m-v1",
    "bigscience-bloom-rail-1.0": "LicenseRef-scancode-bigscience-rail-1.0",
}
"""Hugging Face model card licence ids that are not SPDX ids, as the ScanCode keys license-expression knows; other
unknown ids become ``LicenseRef-hf-<id>`` (kind ``review``, or ``use-restrictions`` for a RAIL licence)."""

_LICENSE_REF = re.compile(r"^(?:DocumentRef-[\w.-]+:)?LicenseRef-[\w.-]+$")
_VERSIONED = re.compile(r"^(?P<base>.+?)-(?P<ver>\d+(?:\.\d+)*)(?P<q>-only|-or-later|\+)?$")


# ------------------------------------------------------------------------------------------------- SPDX expressions
@functools.lru_cache(maxsize=1)
def _spdx():
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


@functools.lru_cache(maxsize=1)
def _categories() -> dict[str, str]:
    """SPDX key (lowercase, aliases included) -> ScanCode category (Permissive, Copyleft, Public Domain...)."""
    from license_expression import get_license_index

    out = {}
    for e in get_license_index():
        if e.get("is_exception"):
            continue
        for k in [e.get("spdx_license_key"), *(e.get("other_spdx_license_keys") or [])]:
            if k:
                out.setdefault(k.lower(), e.get("category") or "")
    return out


def _key(sym) -> str:
    """The canonical identifier of a parsed symbol (exceptions dropped, ``+`` kept)."""
    sym = getattr(sym, "license_symbol", sym)
    key = sym.key
    if key.endswith("+") and key not in _spdx().known_symbols:
        base = _spdx().parse(key[:-1])
        return (base.key if base is not None else key[:-1]) + "+"
    return key


def _known(key: str) -> bool:
    return key in _spdx().known_symbols or key.rstrip("+") in _spdx().known_symbols or bool(_LICENSE_REF.match(key))


def alternatives(expression: str) -> list[frozenset[str]] | None:
    """The choices an SPDX expression offers, each the set of identifiers that apply together (``A AND (B OR C)``
    -> ``{A, B}``, ``{A, C}``); None if it does not parse."""
    from license_expression import ExpressionError

    lic = _spdx()
    try:
        parsed = lic.parse(expression)
    except (ExpressionError, ValueError, TypeError):
        return None
    if parsed is None:
        return None

    def walk(e) -> list[frozenset[str]]:
        if isinstance(e, lic.OR):
            return [a for arg in e.args for a in walk(arg)]
        if isinstance(e, lic.AND):
            out = [frozenset()]
            for arg in e.args:
                out = [x | y for x in out for y in walk(arg)]
            return out
        return [frozenset([_key(e)])]

    return walk(parsed)


def is_spdx(expression: str) -> bool:
    """Whether ``expression`` is a valid SPDX expression of known identifiers (or ``LicenseRef-``)."""
    alts = alternatives(expression)
    return bool(alts) and all(_known(k) for a in alts for k in a)


def parse_release_license(expression: str) -> str:
    """A release licence: a valid SPDX expression of known identifiers (or ``LicenseRef-``), normalised."""
    alts = alternatives(expression)
    if not alts:
        raise StemmaError(f"licence {expression!r} is not a valid SPDX expression")
    unknown = sorted({k for a in alts for k in a if not _known(k)})
    if unknown:
        raise StemmaError(f"licence {expression!r}: unknown SPDX identifier(s) {', '.join(unknown)} "
                          "(write LicenseRef-NAME for a licence SPDX does not list)")
    return str(_spdx().parse(expression))


def kinds_of(key: str) -> tuple[str, ...]:
    """The obligations one licence identifier carries (see the module docstring)."""
    low = key.lower()
    cat = _categories().get(low) or _categories().get(low.rstrip("+"))
    if cat is None:
        return (USE_RESTRICTIONS, ATTRIBUTION) if "rail" in low and low.startswith("licenseref-hf-") else (REVIEW,)
    if cat == "Public Domain":
        return ()
    if cat == "Permissive":
        return (ATTRIBUTION,)
    if cat in ("Copyleft", "Copyleft Limited"):
        return (COPYLEFT, ATTRIBUTION)
    if cat in ("Source-available", "Free Restricted", "Proprietary Free"):
        kinds = []
        if re.search(r"(?:^|-)sa(?:-|$)", low):
            kinds.append(COPYLEFT)
        if re.search(r"(?:^|-)nc(?:-|$)|noncommercial|non-commercial", low):
            kinds.append(NON_COMMERCIAL)
        if re.search(r"(?:^|-)nd(?:-|$)", low):
            kinds.append(NO_DERIVATIVES)
        return (*(kinds or [USE_RESTRICTIONS]), ATTRIBUTION)
    return (REVIEW,)


def _split(key: str) -> tuple[str, tuple[int, ...] | None, bool]:
    """(family without version, version, or-later) of an identifier: GPL-2.0-or-later -> (GPL, (2, 0), True)."""
    m = _VERSIONED.match(key)
    if not m:
        return key, None, False
    return m["base"], tuple(int(x) for x in m["ver"].split(".")), m["q"] in ("-or-later", "+")


def family(key: str) -> str:
    """The licence with its version, without ``-only`` / ``-or-later`` / ``+``: GPL-3.0-or-later -> GPL-3.0."""
    return re.sub(r"(?:-only|-or-later|\+)$", "", key)


def keeps_copyleft(source: str, release: str) -> bool:
    """Whether releasing under identifier ``release`` keeps the copyleft of identifier ``source``."""
    if family(source) == family(release) or family(release) in UPGRADES.get(family(source), ()):
        return True
    sb, sv, later = _split(source)
    rb, rv, _ = _split(release)
    if sv is not None and rv is not None:
        if rb == sb and later and rv >= sv:
            return True
        return later and any(_split(u)[0] == rb and rv >= _split(u)[1] for u in UPGRADES.get(family(source), ()))
    return False


def _keeps(kind: str, source: str, release: str) -> bool:
    if kind == COPYLEFT:
        return keeps_copyleft(source, release)
    if kind == NON_COMMERCIAL:
        return NON_COMMERCIAL in kinds_of(release)
    if kind in (NO_DERIVATIVES, USE_RESTRICTIONS):
        return family(source) == family(release)
    return True  # attribution is carried by the card and the BOM; review is listed, not judged


_RESTRICTIVE = (NON_COMMERCIAL, NO_DERIVATIVES, USE_RESTRICTIONS)


def _kept(kind: str, source: str, alternative: frozenset[str]) -> bool:
    """Whether one alternative of a release expression (licences joined by AND) keeps an obligation. A copyleft
    licence forbids further restrictions: it is dropped when another licence of the same alternative adds
    non-commercial, no-derivatives or use restrictions (GPL-3.0-only AND CC-BY-NC-4.0 keeps neither whole)."""
    keepers = [k for k in alternative if _keeps(kind, source, k)]
    if not keepers:
        return False
    if kind == COPYLEFT:
        restrictive = {k for k in alternative if set(_RESTRICTIVE) & set(kinds_of(k))}
        return any(not restrictive - {keeper} for keeper in keepers)
    return True


# ------------------------------------------------------------------------------------------------- obligations
@dataclass(frozen=True)
class Obligation:
    """One licence identifier that reaches a version, where it came from and the versions that carry it."""

    license: str
    """One SPDX identifier (or ``LicenseRef-``, or the text of a licence that is no SPDX expression)."""
    kinds: tuple[str, ...]
    source: str
    """``dataset NAME`` or ``checkpoint of NODE``."""
    detail: str
    """How the source carries it: ``12 documents``, ``declared``, ``detected in 3 documents``, ``README.md``."""
    chain: tuple[str, ...]
    """``node@version`` labels from the version that took it in down to the version judged."""
    expression: str
    """The source's whole expression (for an ``OR``, the alternative taken is the one this identifier is in)."""

    @property
    def carried(self) -> str:
        """``dataset en-python (trained into en/software/python@abc -> en/software/python/int8@def)``."""
        verb = "trained into" if self.source.startswith("dataset") else "imported as"
        return f"{self.source} ({verb} {' -> '.join(self.chain)})"

    def as_dict(self) -> dict:
        return {"license": self.license, "kinds": list(self.kinds), "source": self.source, "detail": self.detail,
                "chain": list(self.chain), "expression": self.expression}


@dataclass(frozen=True)
class Licensing:
    """Every licence obligation of one version, and what a release licence must keep."""

    version: str
    obligations: tuple[Obligation, ...]
    notes: tuple[str, ...] = ()
    """Sources with no licence recorded (``dataset en: 8 documents without a licence``)."""

    def of_kind(self, kind: str) -> list[Obligation]:
        return [o for o in self.obligations if kind in o.kinds]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if self.of_kind(k))

    def conflicts(self, release: str) -> list[str]:
        """One line per licence and kind of obligation ``release`` (an SPDX expression) drops, naming every chain
        that carries it."""
        alts = alternatives(release) or [frozenset([release])]
        dropped: dict[tuple[str, str], tuple[list[str], frozenset[str]]] = {}
        for o in self.obligations:
            for kind in o.kinds:
                choice = next((a for a in alts if not _kept(kind, o.license, a)), None)
                if choice is not None:
                    dropped.setdefault((o.license, kind), ([], choice))[0].append(o.carried)
        out = []
        for (lic, kind), (carried, choice) in dropped.items():
            by = release if len(alts) == 1 else f"{release} (choosing {' AND '.join(sorted(choice))})"
            out.append(f"{lic} from {' and '.join(carried)} {_REQUIRES[kind](lic)}; {by} drops it")
        return out

    @property
    def implied(self) -> str | None:
        """The release licence the obligations imply, when exactly one of their own licences keeps them all."""
        judged = [o for o in self.obligations if REVIEW not in o.kinds]
        strict = [o for o in judged if set(o.kinds) - {ATTRIBUTION}]
        candidates = sorted({o.license for o in (strict or judged)})
        fits = [c for c in candidates if not self.conflicts(c)]
        if len({family(c) for c in fits}) != 1:
            return None
        only = [c for c in fits if not _split(c)[2]]
        return (only or fits)[0]

    @property
    def summary(self) -> str:
        """A short marker for tables: the implied licence, or the kinds when none is implied."""
        if not self.obligations:
            return "none recorded" if self.notes else "-"
        return self.implied or "?: " + ", ".join(k for k in self.kinds if k != ATTRIBUTION)

    def as_dict(self) -> dict:
        return {"implied": self.implied, "kinds": list(self.kinds),
                "obligations": [o.as_dict() for o in self.obligations], "notes": list(self.notes)}


_REQUIRES = {
    COPYLEFT: lambda lic: f"requires a copyleft licence ({family(lic)}{' or later' if _split(lic)[2] else ''})",
    NON_COMMERCIAL: lambda lic: "forbids commercial use, so the release licence must be non-commercial",
    NO_DERIVATIVES: lambda lic: f"forbids derivatives: only {family(lic)} itself passes it on",
    USE_RESTRICTIONS: lambda lic: f"carries use restrictions that derivatives must pass on ({family(lic)})",
}


def _obligations(expression: str) -> list[tuple[str, tuple[str, ...]]]:
    """(identifier, kinds) of one source expression, its lightest alternative for an ``OR``."""
    if not is_spdx(expression):
        return [(expression, (REVIEW,))]
    alts = alternatives(expression)

    def weight(a: frozenset[str]) -> tuple:
        return sum(_WEIGHT[k] for key in a for k in kinds_of(key)), sorted(a)

    return [(k, kinds_of(k)) for k in sorted(min(alts, key=weight))]


def _dataset_sources(ds) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """(expression, detail, declared) of one dataset row's datasheet, and notes for documents without a licence.

    ``declared`` is False for a licence the curation only detected in texts, declared for no document: it is listed
    for review, never assumed (a licence's own full text is under its verbatim-copying terms, not under itself)."""
    sheet = ds.datasheet or {}
    out: dict[str, list[str]] = {}
    notes = []
    for lic, n in (sheet.get("licenses") or {}).items():
        if lic == "unknown":
            notes.append(f"dataset {ds.name}: {n} documents without a licence")
        else:
            out.setdefault(lic, []).append(f"{n} documents")
    declared = sheet.get("license")
    if declared and declared != "mixed" and declared not in out:
        out.setdefault(declared, []).append("declared")
    declared_ones = set(out)
    for step in sheet.get("curation") or []:
        if step.get("step") == "license":
            for kind, n in (step.get("kinds") or {}).items():
                if kind.startswith("license:"):
                    out.setdefault(kind[8:], []).append(f"detected in {n} documents")
    if not out and not notes:
        notes.append(f"dataset {ds.name}: no licence recorded")
    return [(lic, ", ".join(d), lic in declared_ones) for lic, d in out.items()], notes


def _checkpoint_sources(v: VersionInfo) -> list[tuple[str, str]]:
    """An imported version's licences: the import config's ``license`` and the checkpoint's own metadata."""
    recipe = v.manifest.get("recipe") or {}
    out = []
    if (recipe.get("config") or {}).get("license"):
        out.append((recipe["config"]["license"], "declared in the import config"))
    found = (recipe.get("inputs") or {}).get("license")
    if found and found.get("license") and found["license"] not in [e for e, _ in out]:
        out.append((found["license"], found.get("file", "checkpoint")))
    return out


def licensing(ws: Workspace, version_id: str, cache: dict | None = None) -> Licensing:
    """The licence obligations of a version: one walk of its lineage (``cache`` shares the per-version sources of
    ancestors between calls, as `stemma tree` does)."""
    cache = {} if cache is None else cache
    chain = ws.chain(version_id)
    labels = [c.label for c in chain]
    seen: dict[tuple[str, str], Obligation] = {}
    notes: list[str] = []
    for i, v in enumerate(chain):
        if v.id not in cache:
            cache[v.id] = _own_sources(ws, v)
        sources, own_notes = cache[v.id]
        notes += [n for n in own_notes if n not in notes]
        for source, expression, detail, declared in sources:
            for key, kinds in _obligations(expression):
                if not declared:
                    kinds = (REVIEW,)
                if (key, source) not in seen:
                    seen[(key, source)] = Obligation(key, kinds, source, detail, tuple(labels[i:]), expression)
    return Licensing(version_id, tuple(seen.values()), tuple(notes))


def _own_sources(ws: Workspace, v: VersionInfo) -> tuple[list[tuple[str, str, str, bool]], list[str]]:
    """(source, expression, detail, declared) of the licences a version itself takes in (its datasets, its
    checkpoint)."""
    out, notes = [], []
    if v.row.relation == "import":
        found = _checkpoint_sources(v)
        out += [(f"checkpoint of {v.row.node_path}", e, d, True) for e, d in found]
        if not found:
            notes.append(f"checkpoint of {v.row.node_path}: no licence recorded")
    for ds_id in sorted(set(ws.version_datasets(v.id).values())):
        ds = ws.resolve_dataset(ds_id)
        sources, ds_notes = _dataset_sources(ds)
        out += [(f"dataset {ds.name}", e, d, declared) for e, d, declared in sources]
        notes += ds_notes
    return out, notes


# ------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_license(path: Path) -> dict | None:
    """The licence a Hugging Face checkpoint directory states: its README's YAML metadata (``license``, and
    ``license_name`` for ``other``), else a LICENSE file's text recognised by the curation ``license`` step.
    Returns ``{"license": SPDX expression, "file": name}`` or None."""
    import yaml

    readme = path / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, re.S)
        meta = None
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError:
                meta = None
        if isinstance(meta, dict) and meta.get("license"):
            lic = meta["license"]
            lic = lic[0] if isinstance(lic, list) and lic else lic
            if str(lic).lower() == "other" and meta.get("license_name"):
                lic = meta["license_name"]
            return {"license": hf_to_spdx(str(lic)), "file": "README.md"}
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING"):
        f = path / name
        if f.is_file():
            from .data.curate.base import CurateContext
            from .data.curate.steps.license import LicenseConfig, LicenseDetect

            step = LicenseDetect(LicenseConfig(), CurateContext(name="checkpoint"))
            step.setup()
            found = step.detect(f.read_text(errors="replace"))
            return {"license": " AND ".join(found), "file": name} if found else None
    return None


def hf_to_spdx(lic: str) -> str:
    """A Hugging Face licence id (``apache-2.0``, ``llama3.1``, ``openrail``) as an SPDX expression."""
    if lic.lower() in HF_LICENSES:
        return HF_LICENSES[lic.lower()]
    if is_spdx(lic):
        return str(_spdx().parse(lic))
    return "LicenseRef-hf-" + re.sub(r"[^\w.-]", "-", lic)
