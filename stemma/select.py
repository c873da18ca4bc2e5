"""Profile -> ranked choice of a version, with the reason every other candidate lost.

Candidates are the node asked for, its ancestors (a parent is a valid fallback: less specialised, maybe smaller)
and every variant of each (compressed children: int8, int4, low-rank, pruned, or any device-layer child).
A candidate is one of those versions in one runtime the device has (`Profile.runtimes`): ``torch`` (stemma
itself, the version's own form) or ``llamacpp`` (its GGUF at f32, f16 or q8_0).
Quality is the perplexity on the requested node's own test split (computed once and memoised): in stemma for
``torch``, and for ``llamacpp`` the GGUF's own in llama.cpp on the same windows of the same tokens (with
``measure=False`` and none stored, the version's own stands in, and the reason says so). Memory and speed are
the measured footprints of that runtime and format (`stemma.footprint`), never estimates: a candidate fits when
its measured peak resident memory while generating is within the memory budget and its measured ms/token, scaled
from the machine it was measured on to the target machine by their GEMM throughput, is within the latency budget.
Among equally good candidates the more precise format ranks first (stemma or f32, then f16, then q8_0), then the
smaller one.

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
from .footprint import (
    GGUF_FORMATS,
    RUNTIMES,
    Footprint,
    GGUFRefused,
    LlamaFootprint,
    ensure,
    gguf_files,
    llamacpp_available,
    measure_llamacpp,
    record_llamacpp,
    stored,
    stored_llamacpp,
)
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
    runtimes: list[str] | None = None
    """Runtimes the device has (`stemma.footprint.RUNTIMES`); None: every one. A profile file without the field
    means ``torch`` only."""

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise StemmaError(f"cannot read profile {path}: {e}") from None
        known = {"memory_bytes", "latency_ms", "min_quality", "language", "domain", "machine", "memory", "latency",
                 "runtimes"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StemmaError(f"profile {path}: unknown field(s) {', '.join(unknown)}")
        mem = d.get("memory_bytes", d.get("memory"))
        lat = d.get("latency_ms", d.get("latency"))
        runtimes = d.get("runtimes", ["torch"])  # profiles written before runtimes were recorded: stemma only
        if not isinstance(runtimes, list) or not runtimes:
            raise StemmaError(f"profile {path}: runtimes must be a non-empty list (of {', '.join(RUNTIMES)})")
        return cls(memory_bytes=None if mem is None else parse_bytes(mem), latency_ms=None if lat is None else
                   parse_ms(lat), min_quality=d.get("min_quality"), language=d.get("language"),
                   domain=d.get("domain"), machine=d.get("machine") or {}, runtimes=check_runtimes(runtimes))


def check_runtimes(runtimes) -> list[str]:
    """The runtimes, each one of `RUNTIMES` (an unknown one refused in one line)."""
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise StemmaError(f"unknown runtime {bad[0]!r} (one of {', '.join(RUNTIMES)})")
    return list(dict.fromkeys(runtimes))


@dataclass
class Candidate:
    node: str
    version: VersionInfo
    kind: str
    """``target``, ``ancestor`` or ``variant``."""
    perplexity: float
    footprint: Footprint | LlamaFootprint | None
    """That runtime's (and format's) footprint. None only when nothing asks about memory or speed and no torch
    footprint is stored (``measure=False``)."""
    ms_per_token: float
    """Measured, scaled to the target machine."""
    misses: list[tuple[str, float, str]] = field(default_factory=list)
    """Violated constraints: (what, relative excess, sentence)."""
    reason: str = ""
    runtime: str = "torch"
    """``torch`` (stemma) or ``llamacpp``."""
    ppl_own: bool = False
    """The perplexity is the version's own in stemma, standing in for the GGUF's (not measured in llama.cpp)."""
    fmt: str = "stemma"
    """What the runtime loads: ``stemma`` (the version's own form) or a GGUF type (f32, f16, q8_0)."""

    @property
    def where(self) -> str:
        """The runtime and format, as a reason says them."""
        return "with stemma (PyTorch)" if self.runtime == "torch" else f"in llama.cpp as a {self.fmt} GGUF"

    @property
    def precision(self) -> int:
        """0 for the version's own weights (stemma, f32 GGUF), 1 for f16, 2 for q8_0."""
        return {"f16": 1, "q8_0": 2}.get(self.fmt, 0)

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
        return (f"nothing fits: closest is {c.node} ({c.version.short}) {c.where}, which "
                f"{'; '.join(m[2] for m in c.misses)}")

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
           flags: dict[str, list] | None = None, runtimes=None, gguf_types=None) -> Selection:
    """Rank every candidate for (language, domain) under the constraints; see the module docstring.

    A candidate reached by an active risk flag is left out with the flag as the reason; ``flags`` is
    `stemma.risk.affected`'s answer (read here when None; ``{}`` considers every candidate). ``runtimes``: the
    device's (None: every one in `RUNTIMES`); ``gguf_types``: the llama.cpp formats considered (None: all).
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
    runtimes = check_runtimes(RUNTIMES if runtimes is None else runtimes)
    if not runtimes:
        raise StemmaError("the device has no runtime to select for")
    gguf_types = GGUF_FORMATS if gguf_types is None else tuple(gguf_types)
    target_gflops = (machine or {}).get("gemm_gflops")
    out: list[Candidate] = []
    skipped: list[str] = []
    for node, v, kind in cands:
        if flags.get(v.id):
            skipped.append(f"{node} ({v.short}): {'; '.join(f.label for f in flags[v.id])}")
            continue
        fps: list[Footprint | LlamaFootprint | None] = []
        # The version's own perplexity in stemma: measured for torch; otherwise only read (where no GGUF perplexity
        # is stored and nothing is measured, it stands in for the GGUF's, and the reason says so).
        ppl = evaluator.ppl(v, ds) if measure and "torch" in runtimes else evaluator.stored(v, ds)
        later = "run `stemma build` to measure it"
        if "torch" in runtimes:
            fp = ensure(ws, v.id) if measure else stored(ws, v.id)
            needs_fp = memory_bytes is not None or latency_ms is not None
            if (fp is None and needs_fp) or ppl is None:
                what = " and ".join(w for w, x in (("footprint", fp if needs_fp else 1), ("perplexity", ppl))
                                    if x is None)
                skipped.append(f"{node} ({v.short}): no stored {what}; {later}")
            else:
                fps.append(fp)
        gguf_ppl: dict[str, float | None] = {}
        if "llamacpp" in runtimes:
            gg, gguf_ppl = _llamacpp(ws, evaluator, v, ds, gguf_types, measure)
            if isinstance(gg, str):
                skipped.append(f"{node} ({v.short}) in llama.cpp: {gg}")
            elif gg is None or (ppl is None and not measure):
                own = 1 if measure else ppl  # measuring, each GGUF's own perplexity is measured
                what = " and ".join(w for w, x in (("llama.cpp footprint", gg), ("perplexity", own)) if x is None)
                skipped.append(f"{node} ({v.short}) in llama.cpp: no stored {what}; " + (
                    later if not measure else "llama-cpp-python is not installed here to measure it"))
            else:
                fps += [gg[t] for t in gguf_types if t in gg]
        for fp in fps:
            q = gguf_ppl.get(fp.fmt) if isinstance(fp, LlamaFootprint) else None
            c = _candidate(node, v, kind, ppl if q is None else q, fp, target_gflops, memory_bytes, latency_ms,
                           min_quality)
            c.ppl_own = q is None and c.runtime == "llamacpp"
            out.append(c)
    fitting = sorted((c for c in out if c.fits), key=lambda c: (round(c.perplexity, 6), c.precision, c.memory))
    missing = sorted((c for c in out if not c.fits), key=lambda c: (c.worst_miss, c.perplexity, c.precision))
    if fitting:
        best = fitting[0]
        cost = (f": {_mb(best.memory)} peak, {best.ms_per_token:.1f} ms/token" if best.footprint is not None
                else " (no memory or latency asked)")
        best.reason = f"best perplexity ({best.perplexity:.2f}) of the {len(fitting)} that fit, {best.where}{cost}" \
            + _approx(best)
        for c in fitting[1:]:
            if round(c.perplexity, 6) == round(best.perplexity, 6):
                why = "more precise" if best.precision < c.precision else "smaller"
                c.reason = (f"fits {c.where}, perplexity as good as {best.node} {best.where}, which is {why}"
                            + _approx(c))
            else:
                worse = c.perplexity / best.perplexity - 1
                c.reason = f"fits {c.where}, perplexity {worse:.1%} worse than {best.node}, which also fits" \
                    + _approx(c)
    for c in missing:
        c.reason = f"{c.where}: " + "; ".join(m[2] for m in c.misses)
    if not fitting and not missing:
        why = "has stored measurements" if not any(flags.get(v.id) for _, v, _ in cands) else "can be chosen"
        raise StemmaError(f"no candidate for {target} {why}: {'; '.join(skipped)}")
    return Selection(target=target, dataset_id=ds, ranked=fitting + missing, skipped=skipped)


def _llamacpp(ws: Workspace, evaluator, v: VersionInfo, ds: str, gguf_types, measure: bool):
    """The version's llama.cpp footprints by type (or why llama.cpp cannot run it, or None: not stored and not
    measurable here) and each considered GGUF's perplexity in llama.cpp (None where not stored). With ``measure``,
    what is not stored is measured, the footprints where llama-cpp-python imports here, from one set of GGUF files
    written once for both (`stemma.footprint.gguf_files`)."""
    gg = stored_llamacpp(ws, v.id)

    def stored_ppls() -> dict[str, float | None]:
        return {t: evaluator.stored_gguf(v, ds, t) for t in gguf_types if t in gg}

    measure_fp = measure and gg is None and llamacpp_available()
    ppls: dict[str, float | None] = {}
    if not measure_fp:
        ppls = stored_ppls() if isinstance(gg, dict) else {}
        todo = [t for t, x in ppls.items() if x is None] if measure else []
        if not todo:
            return gg, ppls
    try:
        with gguf_files(ws, v, GGUF_FORMATS if measure_fp else todo) as files:
            if measure_fp:
                gg = measure_llamacpp(ws, v.id, files=files)
                record_llamacpp(ws, v.id, gg)
                ppls = stored_ppls()
                todo = [t for t, x in ppls.items() if x is None]
            ppls.update(evaluator.gguf_measure(v, ds, {t: files[t] for t in todo}))
    except GGUFRefused as e:
        if not measure_fp:
            raise
        gg = str(e)
        record_llamacpp(ws, v.id, gg)
    return gg, ppls


def _approx(c: Candidate) -> str:
    """Whose perplexity the candidate's is (a GGUF's in llama.cpp, or the version's own), and what the file does
    not hold."""
    note = getattr(c.footprint, "note", "")
    if c.runtime != "llamacpp":
        return ""
    approx = (f"; its perplexity is the version's own in stemma, not measured on the {c.fmt} GGUF" if c.ppl_own
              else f"; perplexity measured on the {c.fmt} GGUF in llama.cpp")
    return approx + (f"; {note}" if note else "")


def _candidate(node, v, kind, ppl, fp, target_gflops, memory_bytes, latency_ms, min_quality) -> Candidate:
    """One (version, runtime, format) candidate with every constraint it misses."""
    gemm = fp.machine.get("gemm_gflops") if fp is not None else None
    scale = target_gflops / gemm if target_gflops and gemm else 1.0
    c = Candidate(node=node, version=v, kind=kind, perplexity=ppl, footprint=fp,
                  ms_per_token=fp.ms_per_token / scale if fp is not None else float("nan"),
                  runtime=getattr(fp, "runtime", "torch"), fmt=getattr(fp, "fmt", "stemma"))
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
    return c


def select_profile(ws: Workspace, profile: Profile, **override) -> Selection:
    """`select` with a `Profile`'s fields (keyword arguments override them)."""
    args = {"language": profile.language, "domain": profile.domain, "memory_bytes": profile.memory_bytes,
            "latency_ms": profile.latency_ms, "min_quality": profile.min_quality, "machine": profile.machine,
            "runtimes": profile.runtimes}
    args.update({k: v for k, v in override.items() if v is not None})
    if not args["language"]:
        raise StemmaError("say which language (and domain) the device needs: --language or the profile's language")
    return select(ws, **args)
