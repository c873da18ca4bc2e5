"""Profile -> ranked choice of a version, with the reason every other candidate lost.

Candidates are the node asked for, its ancestors (a parent is a valid fallback: less specialised, maybe smaller)
and every variant of each (compressed children: int8, int4, low-rank, pruned, or any device-layer child).
Quality is the perplexity on the requested node's own test split (computed once and memoised). Memory and speed
are the measured footprints (`stemma.footprint`), never estimates: a candidate fits when its measured peak
resident memory while generating is within the memory budget and its measured ms/token, scaled from the machine
it was measured on to the target machine by their GEMM throughput, is within the latency budget.

With ``measure=False`` (the server's ``model: auto``) nothing is measured or evaluated: a candidate whose
perplexity (or, when memory or latency is asked, footprint) is not stored yet is left out with that reason, and
measuring stays with `stemma build`.

Candidates reached by an active risk flag (`stemma.risk`) are never chosen: they are left out with the flag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StemmaError
from .footprint import Footprint, ensure, stored
from .workspace import VersionInfo, Workspace

VARIANT_RELATIONS = ("quantized", "lowrank", "pruned")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``300MB``, ``1.5GiB``, ``4096`` -> bytes."""
    if isinstance(text, int | float):
        return int(text)
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise StemmaError(f"cannot read {text!r} as a memory size (e.g. 300MB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_ms(text: str | int | float) -> float:
    """``25ms``, ``0.5s``, ``25`` -> milliseconds."""
    if isinstance(text, int | float):
        return float(text)
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$", text)
    if not m:
        raise StemmaError(f"cannot read {text!r} as a latency (e.g. 25ms)")
    return float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)


@dataclass
class Profile:
    """What a device offers and needs (``stemma profile`` writes one for this machine)."""

    memory_bytes: int | None = None
    """Resident memory the model's process may use."""
    latency_ms: float | None = None
    """Longest acceptable time per generated token (single stream)."""
    min_quality: float | None = None
    """Quality floor, as the highest acceptable perplexity on the requested domain's test split."""
    language: str | None = None
    """Language node asked for (e.g. ``en``)."""
    domain: str | None = None
    """Domain below the language (e.g. ``software/python``)."""
    machine: dict[str, Any] = field(default_factory=dict)
    """The device's description; its ``gemm_gflops`` scales measured tokens/s."""

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise StemmaError(f"cannot read profile {path}: {e}") from None
        known = {"memory_bytes", "latency_ms", "min_quality", "language", "domain", "machine", "memory", "latency"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StemmaError(f"profile {path}: unknown field(s) {', '.join(unknown)}")
        mem = d.get("memory_bytes", d.get("memory"))
        lat = d.get("latency_ms", d.get("latency"))
        return cls(memory_bytes=None if mem is None else parse_bytes(mem), latency_ms=None if lat is None else
                   parse_ms(lat), min_quality=d.get("min_quality"), language=d.get("language"),
                   domain=d.get("domain"), machine=d.get("machine") or {})


@dataclass
class Candidate:
    node: str
    version: VersionInfo
    kind: str
    """``target``, ``ancestor`` or ``variant``."""
    perplexity: float
    footprint: Footprint | None
    """None only when nothing asks about memory or speed and none is stored (``measure=False``)."""
    ms_per_token: float
    """Measured, scaled to the target machine."""
    misses: list[tuple[str, float, str]] = field(default_factory=list)
    """Violated constraints: (what, relative excess, sentence)."""
    reason: str = ""

    @property
    def fits(self) -> bool:
        return not self.misses

    @property
    def memory(self) -> int:
        return self.footprint.rss_generate_bytes if self.footprint is not None else 0

    @property
    def worst_miss(self) -> float:
        return max((m[1] for m in self.misses), default=0.0)


@dataclass
class Selection:
    target: str
    dataset_id: str
    ranked: list[Candidate]
    """Fitting candidates best first, then the rest by how little they miss."""
    skipped: list[str] = field(default_factory=list)
    """Candidates left out, with the reason: an active risk flag, or (``measure=False``) nothing stored to judge
    them by."""

    @property
    def choice(self) -> Candidate | None:
        return self.ranked[0] if self.ranked and self.ranked[0].fits else None

    def nothing_fits(self) -> str:
        c = self.ranked[0]
        return f"nothing fits: closest is {c.node} ({c.version.short}), which {'; '.join(m[2] for m in c.misses)}"

    def require(self) -> Candidate:
        """The choice, or a `StemmaError` saying what comes closest and by how much it misses."""
        if self.choice is None:
            raise StemmaError(self.nothing_fits())
        return self.choice


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def candidates_for(ws: Workspace, target: str) -> list[tuple[str, VersionInfo, str]]:
    """(node, version, kind) for the node, its ancestors and all their variants."""
    node = ws.node(target)
    if node is None or not node.current_version:
        raise StemmaError(f"unknown node {target!r}; see `stemma tree`")
    nodes = ws.nodes()
    out: list[tuple[str, VersionInfo, str]] = []
    cur: str | None = target
    while cur:
        n = next(x for x in nodes if x.path == cur)
        if n.current_version:
            out.append((cur, ws.version(n.current_version), "target" if cur == target else "ancestor"))
        for child in nodes:
            if child.parent_path == cur and child.current_version and child.path != target:
                v = ws.version(child.current_version)
                if child.layer == "device" or v.row.relation in VARIANT_RELATIONS:
                    out.append((child.path, v, "variant"))
        cur = n.parent_path
    return out


def select(ws: Workspace, language: str, domain: str | None = None, memory_bytes: int | None = None,
           latency_ms: float | None = None, min_quality: float | None = None,
           machine: dict[str, Any] | None = None, measure: bool = True,
           flags: dict[str, list] | None = None) -> Selection:
    """Rank every candidate for (language, domain) under the constraints; see the module docstring.

    A candidate reached by an active risk flag is left out with the flag as the reason; ``flags`` is
    `stemma.risk.affected`'s answer (read here when None; ``{}`` considers every candidate).
    """
    from .evaluate.evaluator import Evaluator
    from .progress import NullReporter

    target = language + (f"/{domain.strip('/')}" if domain else "")
    if memory_bytes is not None and memory_bytes <= 0 or latency_ms is not None and latency_ms <= 0:
        raise StemmaError("memory and latency budgets must be positive")
    cands = candidates_for(ws, target)
    if flags is None:
        from .risk import affected

        flags = affected(ws)
    tv = next(v for _, v, k in cands if k == "target")
    ds = ws.version_datasets(tv.id).get("train")
    if ds is None:
        raise StemmaError(f"{target} has no dataset of its own to measure quality on")
    evaluator = Evaluator(ws, NullReporter())
    target_gflops = (machine or {}).get("gemm_gflops")
    out: list[Candidate] = []
    skipped: list[str] = []
    for node, v, kind in cands:
        if flags.get(v.id):
            skipped.append(f"{node} ({v.short}): {'; '.join(f.label for f in flags[v.id])}")
            continue
        if measure:
            fp, ppl = ensure(ws, v.id), evaluator.ppl(v, ds)
        else:
            fp, ppl = stored(ws, v.id), evaluator.stored(v, ds)
            needs_fp = memory_bytes is not None or latency_ms is not None
            if (fp is None and needs_fp) or ppl is None:
                what = " and ".join(w for w, x in (("footprint", fp if needs_fp else 1), ("perplexity", ppl))
                                    if x is None)
                skipped.append(f"{node} ({v.short}): no stored {what}; run `stemma build` to measure it")
                continue
        gemm = fp.machine.get("gemm_gflops") if fp is not None else None
        scale = target_gflops / gemm if target_gflops and gemm else 1.0
        c = Candidate(node=node, version=v, kind=kind, perplexity=ppl, footprint=fp,
                      ms_per_token=fp.ms_per_token / scale if fp is not None else float("nan"))
        if memory_bytes is not None and c.memory > memory_bytes:
            over = c.memory - memory_bytes
            c.misses.append(("memory", over / memory_bytes, f"needs {_mb(c.memory)} peak memory, {_mb(over)} "
                             f"({over / memory_bytes:.0%}) over the {_mb(memory_bytes)} budget"))
        if latency_ms is not None and c.ms_per_token > latency_ms:
            over = c.ms_per_token - latency_ms
            c.misses.append(("latency", over / latency_ms, f"takes {c.ms_per_token:.1f} ms/token, {over:.1f} ms "
                             f"({over / latency_ms:.0%}) over the {latency_ms:g} ms budget"))
        if min_quality is not None and ppl > min_quality:
            over = ppl - min_quality
            c.misses.append(("quality", over / min_quality, f"has perplexity {ppl:.2f}, {over / min_quality:.0%} "
                             f"above the floor of {min_quality:g}"))
        out.append(c)
    fitting = sorted((c for c in out if c.fits), key=lambda c: (round(c.perplexity, 6), c.memory))
    missing = sorted((c for c in out if not c.fits), key=lambda c: (c.worst_miss, c.perplexity))
    if fitting:
        best = fitting[0]
        cost = (f", {_mb(best.memory)} peak, {best.ms_per_token:.1f} ms/token" if best.footprint is not None
                else " (no memory or latency asked)")
        best.reason = f"best perplexity ({best.perplexity:.2f}) of the {len(fitting)} that fit{cost}"
        for c in fitting[1:]:
            worse = c.perplexity / best.perplexity - 1
            c.reason = f"fits, perplexity {worse:.1%} worse than {best.node}, which also fits"
    for c in missing:
        c.reason = "; ".join(m[2] for m in c.misses)
    if not fitting and not missing:
        why = "has stored measurements" if not any(flags.get(v.id) for _, v, _ in cands) else "can be chosen"
        raise StemmaError(f"no candidate for {target} {why}: {'; '.join(skipped)}")
    return Selection(target=target, dataset_id=ds, ranked=fitting + missing, skipped=skipped)


def select_profile(ws: Workspace, profile: Profile, **override) -> Selection:
    """`select` with a `Profile`'s fields (keyword arguments override them)."""
    args = {"language": profile.language, "domain": profile.domain, "memory_bytes": profile.memory_bytes,
            "latency_ms": profile.latency_ms, "min_quality": profile.min_quality, "machine": profile.machine}
    args.update({k: v for k, v in override.items() if v is not None})
    if not args["language"]:
        raise StemmaError("say which language (and domain) the device needs: --language or the profile's language")
    return select(ws, **args)
