"""Aggregation strategies, registered by name, shared by the registry path and the Flower server.

Each strategy turns n updates (dicts of tensors with equal keys and shapes) into one. They work on the
updates flattened into an n x D matrix:
- ``fedavg``: the mean weighted by example counts (McMahan et al., 2017);
- ``median``: the coordinate-wise median (Yin et al., 2018);
- ``trimmed_mean``: per coordinate, the mean after dropping the largest and smallest ``trim`` share (Yin et al.);
- ``krum`` / ``multikrum``: the update(s) closest to their n - f - 2 nearest neighbours (Blanchard et al., 2017).
Every strategy can first clip each update's L2 norm to a bound or to the round's median norm, which takes
the teeth out of scaled updates (a contributor multiplying its delta by 50).

Flower ships these strategies too, but bound to its own message types and server loop; the registry path must
aggregate stored updates without a Flower server, so the arithmetic lives here, once, and the Flower server
calls it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..errors import SpecError, StemmaError


@dataclass(frozen=True)
class AggregateResult:
    delta: dict[str, torch.Tensor]
    """The aggregate: the inputs' keys and shapes, float32."""
    selected: list[int]
    """Indices of the inputs that went into the aggregate."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts: norms before and after clipping, Krum scores."""


@dataclass(frozen=True)
class ClipConfig:
    """Norm clipping, applied to each update before aggregation."""

    clip: float | Literal["median"] | None = None
    """Largest L2 norm an update keeps (scaled down beyond it); ``median``: the round's median norm; none: off."""


_STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    _STRATEGIES[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_STRATEGIES)


def get(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """A configured strategy; unknown names and bad settings raise `SpecError`."""
    from pydantic import TypeAdapter, ValidationError

    cls = _STRATEGIES.get(name)
    if cls is None:
        raise SpecError(f"unknown aggregation strategy {name!r} (known: {', '.join(names())})")
    raw = dict(params or {})
    known = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"strategy {name}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        cfg = TypeAdapter(cls.config_cls).validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(f"strategy {name}: setting {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    if isinstance(cfg.clip, float) and cfg.clip <= 0:
        raise SpecError(f"strategy {name}: clip must be > 0")
    cls.check(cfg, name)
    return cls(cfg)


def _flatten(deltas: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, torch.Size, int]]]:
    if not deltas:
        raise StemmaError("nothing to aggregate: no updates")
    keys = sorted(deltas[0])
    layout, total = [], 0
    for k in keys:
        layout.append((k, deltas[0][k].shape, deltas[0][k].numel()))
        total += deltas[0][k].numel()
    mat = torch.empty(len(deltas), total, dtype=torch.float32)
    for i, d in enumerate(deltas):
        if sorted(d) != keys:
            raise StemmaError(f"update {i} changes other weights than update 0; they cannot be aggregated")
        off = 0
        for k, shape, n in layout:
            t = d[k]
            if t.shape != shape:
                raise StemmaError(f"update {i}: {k} has shape {tuple(t.shape)}, update 0 has {tuple(shape)}")
            mat[i, off:off + n] = t.reshape(-1).float()
            off += n
        if not bool(torch.isfinite(mat[i]).all()):
            raise StemmaError(f"update {i} holds NaN or infinite values")
    return mat, layout


def _unflatten(vec: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for k, shape, n in layout:
        out[k] = vec[off:off + n].reshape(shape).clone()
        off += n
    return out


class Strategy:
    name: ClassVar[str]
    config_cls: ClassVar[type] = ClipConfig

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg, name: str) -> None:
        """Validate settings that types alone cannot."""

    def aggregate(self, deltas: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> AggregateResult:
        mat, layout = _flatten(deltas)
        n = mat.shape[0]
        w = torch.ones(n, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
        if w.numel() != n or bool((w < 0).any()) or float(w.sum()) <= 0 or not bool(torch.isfinite(w).all()):
            raise StemmaError("aggregation weights must be one non-negative number per update, with a positive sum")
        norms = mat.double().norm(dim=1)
        info: dict[str, Any] = {"n": n, "norms": [round(float(x), 6) for x in norms]}
        bound = self.cfg.clip
        if bound == "median":
            bound = float(torch.quantile(norms, 0.5))  # the mean of the middle two for even n
        if bound is not None:
            scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
            mat = mat * scale.float()[:, None]
            info["clip"] = float(bound)
            info["clipped"] = [i for i in range(n) if float(scale[i]) < 1.0]
        vec, selected, extra = self.combine(mat, w)
        info.update(extra)
        return AggregateResult(_unflatten(vec, layout), selected, info)

    def combine(self, mat: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[int], dict]:
        raise NotImplementedError


@register
class FedAvg(Strategy):
    name = "fedavg"

    def combine(self, mat, w):
        ww = (w / w.sum()).float()
        return ww @ mat, list(range(mat.shape[0])), {}


@register
class Median(Strategy):
    name = "median"

    def combine(self, mat, w):
        # torch.median returns the lower of the two middle values for even n; the mean of both is the median.
        s, _ = torch.sort(mat, dim=0)
        n = mat.shape[0]
        med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return med, list(range(n)), {}


@dataclass(frozen=True)
class TrimmedMeanConfig(ClipConfig):
    """Coordinate-wise trimmed mean."""

    trim: float = 0.2
    """Share of the values dropped at each end of every coordinate (0.2 of 20 updates: the 4 largest and 4
    smallest)."""


@register
class TrimmedMean(Strategy):
    name = "trimmed_mean"
    config_cls = TrimmedMeanConfig

    @classmethod
    def check(cls, cfg, name):
        if not 0 <= cfg.trim < 0.5:
            raise SpecError(f"strategy {name}: trim must be in [0, 0.5)")

    def combine(self, mat, w):
        n = mat.shape[0]
        k = int(math.floor(self.cfg.trim * n))
        if n - 2 * k < 1:
            raise StemmaError(f"trimmed_mean: trimming {k} from each end of {n} updates leaves none")
        s, _ = torch.sort(mat, dim=0)
        return s[k:n - k].mean(dim=0), list(range(n)), {"trimmed_each_end": k}


@dataclass(frozen=True)
class KrumConfig(ClipConfig):
    """Krum: keep the update(s) whose nearest neighbours are closest."""

    f: int | None = None
    """Byzantine updates assumed among the n; default: the most Krum tolerates, (n - 3) // 2."""
    m: int | None = None
    """Updates averaged by multikrum (ignored by krum); default n - f."""


def _krum_scores(mat: torch.Tensor, f: int) -> torch.Tensor:
    d = torch.cdist(mat.double(), mat.double()) ** 2
    n = mat.shape[0]
    k = n - f - 2
    d.fill_diagonal_(float("inf"))
    nearest, _ = torch.topk(d, k, dim=1, largest=False)
    return nearest.sum(dim=1)


@register
class Krum(Strategy):
    name = "krum"
    config_cls = KrumConfig

    def _f(self, n: int) -> int:
        f = self.cfg.f if self.cfg.f is not None else max(0, (n - 3) // 2)
        if f < 0 or n < 2 * f + 3:
            raise StemmaError(f"{self.name}: {n} updates cannot tolerate f={f} Byzantine ones (needs n >= 2f + 3)")
        return f

    def _select(self, mat: torch.Tensor, m: int) -> tuple[list[int], dict]:
        f = self._f(mat.shape[0])
        scores = _krum_scores(mat, f)
        order = torch.argsort(scores).tolist()
        return sorted(order[:m]), {"f": f, "scores": [round(float(s), 6) for s in scores]}

    def combine(self, mat, w):
        sel, info = self._select(mat, 1)
        return mat[sel[0]].clone(), sel, info


@register
class MultiKrum(Krum):
    name = "multikrum"

    def combine(self, mat, w):
        n = mat.shape[0]
        f = self._f(n)
        m = self.cfg.m if self.cfg.m is not None else n - f
        if not 1 <= m <= n:
            raise StemmaError(f"multikrum: m={m} must be between 1 and the {n} updates")
        sel, info = self._select(mat, m)
        ww = w[sel] / w[sel].sum()
        return ww.float() @ mat[sel], sel, {**info, "m": m}
