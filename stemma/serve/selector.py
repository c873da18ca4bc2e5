"""A simple selector for ``model: auto``: requirements -> the deepest servable node that meets them, with why.

Kept deliberately small; a full selector (profiles, variants, measured quality) replaces it behind the same
call: ``select(ws, language=..., domain=..., memory_bytes=..., latency_ms=...) -> Selection``.
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


def _language(path: str, layer: str) -> str | None:
    return None if layer == "master" else path.split("/")[0]


def _footprint(ws, version_id: str) -> tuple[int, int]:
    """(bytes, params) of a version as served: its nearest full-weight ancestor plus the adapters below it."""
    chain = ws.chain(version_id)
    start = max(i for i, v in enumerate(chain) if "model.safetensors" in v.manifest["files"])
    return sum(v.row.bytes for v in chain[start:]), chain[-1].row.params


def select(ws, *, language: str | None = None, domain: str | None = None, memory_bytes: int | None = None,
           latency_ms: float | None = None, flops_per_s: float | None = None, servable=None) -> Selection:
    """Pick a version for the requirements.

    Args:
        ws: the workspace.
        language: language code the model must be specialised in (``en``); None: any, the master preferred.
        domain: domain or sub-domain (``software``, ``python``); the deepest node naming it wins.
        memory_bytes: the served footprint (full weights + adapter chain, as stored) must fit.
        latency_ms: per-token latency bound, checked against a lower bound ``2 * params / flops_per_s``.
        flops_per_s: measured matrix-multiply rate of this machine (needed for ``latency_ms``).
        servable: optional predicate on a version id (e.g. the server only runs GPT-2).
    """
    cands = []
    for n in ws.nodes():
        if not n.current_version or (servable is not None and not servable(n.current_version)):
            continue
        lang = _language(n.path, n.layer)
        if language and lang != language:
            continue
        parts = n.path.split("/")[1:] if lang else []
        dom_depth = max((i + 1 for i, p in enumerate(parts) if p == domain), default=0) if domain else 0
        nbytes, params = _footprint(ws, n.current_version)
        cands.append((n, dom_depth, len(parts), nbytes, params))
    if not cands:
        raise NoModelError(f"no servable model for language {language!r}" if language else "no servable model")
    notes = []
    if memory_bytes is not None:
        fit = [c for c in cands if c[3] <= memory_bytes]
        if not fit:
            raise NoModelError(f"no model for these requirements fits in {memory_bytes} bytes "
                               f"(smallest needs {min(c[3] for c in cands)})")
        cands = fit
    if latency_ms is not None and flops_per_s:
        fit = [c for c in cands if 2 * c[4] / flops_per_s * 1e3 <= latency_ms]
        if not fit:
            raise NoModelError(f"no model for these requirements can reach {latency_ms} ms per token here")
        cands = fit
    if domain and not any(c[1] for c in cands):
        notes.append(f"no node for domain {domain!r}, using the most general match")
    # Domain match first (deepest), then: with a domain, the most specific node; without one, the most general.
    best = max(cands, key=lambda c: (c[1] > 0, c[1], c[2] if domain else -c[2], -c[3]))
    n, _, _, nbytes, _ = best
    why = [f"language {language}" if language else "any language",
           f"domain {domain}" if domain and best[1] else None,
           f"{nbytes} bytes" + (f" <= {memory_bytes}" if memory_bytes is not None else ""),
           f"latency bound {latency_ms} ms" if latency_ms is not None and flops_per_s else None]
    reason = f"{n.path}: " + ", ".join(w for w in why if w) + ("; " + "; ".join(notes) if notes else "")
    return Selection(version_id=n.current_version, node=n.path, reason=reason)
