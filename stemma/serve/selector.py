"""``model: auto``: the server's requirements (language, domain, memory, latency) through `stemma.select`.

The device selector ranks the requested node, its ancestors and their variants by measured quality under
measured memory and latency; this adapter maps a domain name to its node, keeps the versions this server can
run, and answers in the server's terms (a version, a node and the reason).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StemmaError


class NoModelError(StemmaError):
    """No version meets the requirements."""


@dataclass(frozen=True)
class Selection:
    version_id: str
    node: str
    reason: str


def _domain_path(ws, language: str, domain: str | None) -> tuple[str | None, str | None]:
    """(domain path under the language node, note): ``python`` finds ``en/software/python``; no match: None."""
    if not domain:
        return None, None
    domain = domain.strip("/")
    paths = {n.path for n in ws.nodes() if n.current_version}
    if f"{language}/{domain}" in paths:
        return domain, None
    last = domain.split("/")[-1]
    hits = sorted((p for p in paths if p.startswith(language + "/") and p.split("/")[-1] == last),
                  key=lambda p: (p.count("/"), p))
    if hits:
        return hits[0][len(language) + 1:], None
    return None, f"no node for domain {domain!r} under {language}, using {language} itself"


def select(ws, *, language: str | None = None, domain: str | None = None, memory_bytes: int | None = None,
           latency_ms: float | None = None, servable=None, flags: dict[str, list] | None = None) -> Selection:
    """Pick a servable version for the requirements with `stemma.select` (the device selector).

    Candidates are the requested node, its ancestors and their variants, ranked by perplexity on the requested
    node's test split among those whose measured peak memory and per-token latency fit; the first that this
    server can run (``servable``) wins. Without a language, the tree's master is served. Versions in ``flags``
    (`stemma.risk.affected`: version id -> the active flags reaching it; None reads it) are never chosen.
    """
    from ..risk import affected
    from ..select import select as rank

    flags = affected(ws) if flags is None else flags
    if not language:
        roots = [n for n in ws.nodes() if n.current_version and not n.parent_path
                 and (servable is None or servable(n.current_version))]
        clean = [n for n in roots if not flags.get(n.current_version)]
        if roots and not clean:
            why = "; ".join(f.label for f in flags[roots[0].current_version])
            raise NoModelError(f"{roots[0].path} is flagged: {why}")
        roots = clean
        if not roots:
            raise NoModelError("no servable model")
        return Selection(roots[0].current_version, roots[0].path, f"{roots[0].path}: no language asked, the master")
    if not any(n.path == language and n.current_version for n in ws.nodes()):
        raise NoModelError(f"no model for language {language!r}")
    dom, note = _domain_path(ws, language, domain)
    try:
        # Stored measurements only: a request never starts a footprint process or an evaluation. The server runs
        # versions with stemma, so only the torch footprints count.
        ranked = rank(ws, language, dom, memory_bytes=memory_bytes, latency_ms=latency_ms, measure=False,
                      flags=flags, runtimes=["torch"])
    except StemmaError as e:
        raise NoModelError(str(e)) from None
    unservable = []
    for c in ranked.ranked:
        if not c.fits:
            break
        if servable is not None and not servable(c.version.id):
            unservable.append(c.node)
            continue
        reason = f"{c.node}: {c.reason}" + (f"; {note}" if note else "")
        if unservable:
            reason += f"; better fits this server cannot run: {', '.join(unservable)}"
        if ranked.skipped:
            reason += f"; not considered: {'; '.join(ranked.skipped)}"
        return Selection(c.version.id, c.node, reason)
    if unservable:
        raise NoModelError(f"only variants this server cannot run fit: {', '.join(unservable)}")
    raise NoModelError(ranked.nothing_fits())
