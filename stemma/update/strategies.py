"""Aggregation strategies, registered by name, shared by the registry path and the Flower server.

Each strategy turns n updates (dicts of tensors with equal keys and shapes) into one. They work on the
updates flattened into one n x D float32 matrix (the only full-size copy; the rest runs in place or over
column chunks):
- ``fedavg``: the mean weighted by example counts (McMahan et al., 2017);
- ``median``: the coordinate-wise median (Yin et al., 2018);
- ``trimmed_mean``: per coordinate, the mean after dropping the largest and smallest ``trim`` share (Yin et al.);
- ``krum`` / ``multikrum``: the update(s) closest to their n - f - 2 nearest neighbours (Blanchard et al., 2017);
  multikrum averages the ``m`` best, weighted like fedavg.
The weights only matter to ``fedavg`` and ``multikrum``; the median, the trimmed mean and Krum treat every
update alike (a weight is a claim by the contributor, and these strategies exist not to trust claims).

Every strategy can first clip each update's L2 norm (over all its tensors) to a bound or to the round's
median norm, which takes the teeth out of scaled updates (a contributor multiplying its delta by 50).

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
from ..plugins import Registry

_CHUNK = 1 << 22
"""Elements per column chunk for the coordinate-wise strategies and the Krum distances (16 MB of float32)."""


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
    """Norm clipping, applied to each update before aggregation (every strategy has it)."""

    clip: float | Literal["median"] | None = None
    """Largest L2 norm an update keeps, over all its tensors (scaled down beyond it); ``median``: the round's
    median norm; none: off."""


_STRATEGIES: Registry[type[Strategy]] = Registry("aggregation strategy", lambda cls: cls.name, SpecError)
register, names = _STRATEGIES.register, _STRATEGIES.names


def get(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """A configured strategy; unknown names and bad settings raise `SpecError` with a one-line message."""
    from pydantic import TypeAdapter, ValidationError

    cls = _STRATEGIES.get(name)
    if params is not None and not isinstance(params, dict):
        raise SpecError(f"strategy {name}: settings must be a mapping, got {type(params).__name__}")
    raw = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"strategy {name}: unknown setting(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(sorted(fields))})")
    for key, value in raw.items():  # pydantic reads true as 1 in lax mode; no setting here is a switch
        if isinstance(value, bool) and "bool" not in str(fields[key].type):
            raise SpecError(f"strategy {name}: setting {key}: expected a number, got {str(value).lower()}")
    try:
        cfg = TypeAdapter(cls.config_cls).validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(f"strategy {name}: setting {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    cls.check(cfg, name)
    return cls(cfg)


def _flatten(deltas: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, torch.Size, int]]]:
    """The updates as one n x D float32 matrix over the union of their keys (sorted) and the layout to undo it.

    An update that leaves a weight alone has a zero delta there: a LoRA update (dense over the adapted
    matrices) and a full one (every weight) aggregate together, and a weight only a few updates touch gets
    the strategy's verdict over all of them (the median of mostly zeros is zero).
    """
    if not isinstance(deltas, (list, tuple)) or not deltas:
        raise StemmaError("nothing to aggregate: no updates")
    shapes: dict[str, tuple[int, torch.Size]] = {}
    for i, d in enumerate(deltas):
        if not isinstance(d, dict) or not d:
            raise StemmaError(f"update {i} holds no tensors")
        for k, t in d.items():
            if not isinstance(t, torch.Tensor):
                raise StemmaError(f"update {i}: {k} is a {type(t).__name__}, not a tensor")
            first = shapes.setdefault(k, (i, t.shape))
            if first[1] != t.shape:
                raise StemmaError(f"update {i}: {k} has shape {tuple(t.shape)}, update {first[0]} has "
                                  f"{tuple(first[1])}")
    layout, total = [], 0
    for k in sorted(shapes):
        shape = shapes[k][1]
        layout.append((k, shape, shape.numel()))
        total += shape.numel()
    mat = torch.zeros(len(deltas), total, dtype=torch.float32)
    for i, d in enumerate(deltas):
        off = 0
        for k, _, n in layout:
            if k in d:
                mat[i, off:off + n] = d[k].detach().reshape(-1)
            off += n
        if not bool(torch.isfinite(mat[i]).all()):
            off = 0
            for k, _, n in layout:
                if not bool(torch.isfinite(mat[i, off:off + n]).all()):
                    # Finite in its own dtype but not in float32: too large to aggregate, not NaN.
                    why = "values beyond float32" if bool(torch.isfinite(d[k]).all()) else "NaN or infinite values"
                    raise StemmaError(f"update {i} holds {why} (in {k})")
                off += n
    return mat, layout


def _unflatten(vec: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Independent float32 tensors (no shared storage, so safetensors can save them)."""
    out, off = {}, 0
    for k, shape, n in layout:
        out[k] = vec[off:off + n].reshape(shape).clone()
        off += n
    return out


def _row_norms(mat: torch.Tensor) -> torch.Tensor:
    """L2 norm of every row, accumulated in float64 without a float64 copy of the matrix."""
    return torch.stack([torch.linalg.vector_norm(mat[i], dtype=torch.float64) for i in range(mat.shape[0])])


def _column_chunks(mat: torch.Tensor):
    """(start, n x c block) over ``mat``'s columns, about `_CHUNK` elements each, so temporaries stay small."""
    n, d = mat.shape
    step = max(1, _CHUNK // max(n, 1))
    for lo in range(0, d, step):
        yield lo, mat[:, lo:lo + step]


def _by_columns(mat: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to column chunks of ``mat`` (each n x c -> c)."""
    out = torch.empty(mat.shape[1], dtype=torch.float32)
    for lo, block in _column_chunks(mat):
        out[lo:lo + block.shape[1]] = fn(block)
    return out


class Strategy:
    """One aggregation rule with its validated settings (``cfg``, an instance of ``config_cls``)."""

    name: ClassVar[str]
    config_cls: ClassVar[type] = ClipConfig

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg, name: str) -> None:
        """Validate settings that types alone cannot."""
        clip = cfg.clip
        if isinstance(clip, float) and not (math.isfinite(clip) and clip > 0):
            raise SpecError(f"strategy {name}: clip must be a finite number > 0 or 'median', got {clip}")

    def aggregate(self, deltas: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> AggregateResult:
        """Aggregate ``deltas`` (weights: e.g. example counts; default equal); bad input raises `StemmaError`."""
        mat, layout = _flatten(deltas)
        n = mat.shape[0]
        w = self._weights(weights, n)
        norms = _row_norms(mat)
        info: dict[str, Any] = {"strategy": self.name, "n": n, "norms": [round(float(x), 6) for x in norms]}
        bound = self.cfg.clip
        if bound == "median":
            bound = float(torch.quantile(norms, 0.5))  # the mean of the middle two for even n
        if bound is not None:
            scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
            mat.mul_(scale.float()[:, None])
            info["clip"] = round(float(bound), 6)
            info["clipped"] = [i for i in range(n) if float(scale[i]) < 1.0]
            info["norms_after"] = [round(float(x), 6) for x in norms * scale]
        else:
            info["norms_after"] = list(info["norms"])
        vec, selected, extra = self.combine(mat, w)
        info.update(extra)
        return AggregateResult(_unflatten(vec, layout), selected, info)

    @staticmethod
    def _weights(weights: list[float] | None, n: int) -> torch.Tensor:
        if weights is None:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        try:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        except (TypeError, ValueError):
            raise StemmaError("aggregation weights must be numbers") from None
        if w.numel() != n:
            raise StemmaError(f"aggregation weights: {w.numel()} given for {n} updates")
        for i in range(n):
            if not math.isfinite(float(w[i])) or float(w[i]) < 0:
                raise StemmaError(f"aggregation weight {i} is {float(w[i])}; weights must be finite and >= 0")
        if float(w.sum()) <= 0:
            raise StemmaError("aggregation weights sum to 0; at least one must be positive")
        return w / w.sum()

    def combine(self, mat: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[int], dict]:
        """The aggregate vector, the rows used, extra info; ``mat`` may be modified, ``w`` sums to 1."""
        raise NotImplementedError


@register
class FedAvg(Strategy):
    """The weighted mean of all updates."""

    name = "fedavg"

    def combine(self, mat, w):
        return w.float() @ mat, list(range(mat.shape[0])), {}


def _median_cols(block: torch.Tensor) -> torch.Tensor:
    # torch.median returns the lower of the two middle values for even n; the median is the mean of both.
    n = block.shape[0]
    if n % 2:
        return block.median(dim=0).values
    s, _ = torch.sort(block, dim=0)
    return (s[n // 2 - 1] + s[n // 2]) / 2


@register
class Median(Strategy):
    """The coordinate-wise median."""

    name = "median"

    def combine(self, mat, w):
        return _by_columns(mat, _median_cols), list(range(mat.shape[0])), {}


@dataclass(frozen=True)
class TrimmedMeanConfig(ClipConfig):
    """Coordinate-wise trimmed mean."""

    trim: float = 0.2
    """Share of the values dropped at each end of every coordinate, in [0, 0.5): floor(trim * n) from each end
    (0.2 of 20 updates: the 4 largest and the 4 smallest)."""


@register
class TrimmedMean(Strategy):
    """Per coordinate, the mean of the values left after dropping the ``trim`` share at both ends."""

    name = "trimmed_mean"
    config_cls = TrimmedMeanConfig

    @classmethod
    def check(cls, cfg, name):
        super().check(cfg, name)
        if not 0 <= cfg.trim < 0.5:
            raise SpecError(f"strategy {name}: trim must be in [0, 0.5), got {cfg.trim} (nothing would remain)")

    def combine(self, mat, w):
        n = mat.shape[0]
        k = int(math.floor(self.cfg.trim * n))
        if n - 2 * k < 1:  # unreachable with trim < 0.5; kept so a looser check cannot average nothing
            raise StemmaError(f"trimmed_mean: trimming {k} from each end of {n} updates leaves none")

        def cols(block):
            s, _ = torch.sort(block, dim=0)
            return s[k:n - k].mean(dim=0)

        return _by_columns(mat, cols), list(range(n)), {"trimmed_each_end": k}


@dataclass(frozen=True)
class KrumConfig(ClipConfig):
    """Krum: keep the update whose nearest neighbours are closest."""

    f: int | None = None
    """Byzantine updates assumed among the n (Krum needs n >= 2f + 3); default: the most it tolerates,
    (n - 3) // 2."""


@dataclass(frozen=True)
class MultiKrumConfig(KrumConfig):
    """Multi-Krum: average the best-scored updates."""

    m: int | None = None
    """Updates averaged (the ``m`` lowest Krum scores, weighted like fedavg); default n - f."""


def _sq_distances(mat: torch.Tensor) -> torch.Tensor:
    """n x n squared L2 distances in float64, from a Gram matrix summed over column chunks."""
    n = mat.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for _, block in _column_chunks(mat):
        block = block.double()
        gram += block @ block.T
    sq = gram.diagonal().clone()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)


def krum_scores(mat: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's sum of squared distances to its n - f - 2 nearest other rows (Blanchard et al., 2017)."""
    n = mat.shape[0]
    d = _sq_distances(mat)
    d.fill_diagonal_(float("inf"))
    nearest, _ = torch.topk(d, n - f - 2, dim=1, largest=False)
    return nearest.sum(dim=1)


@register
class Krum(Strategy):
    """The single update with the lowest Krum score."""

    name = "krum"
    config_cls = KrumConfig

    @classmethod
    def check(cls, cfg, name):
        super().check(cfg, name)
        for field_name, least in (("f", 0), ("m", 1)):  # m: multikrum only
            value = getattr(cfg, field_name, None)
            if value is not None and value < least:
                raise SpecError(f"strategy {name}: {field_name} must be >= {least}, got {value}")

    def _f(self, n: int) -> int:
        f = self.cfg.f if self.cfg.f is not None else max(0, (n - 3) // 2)
        if n < 2 * f + 3:
            raise StemmaError(f"{self.name}: {n} updates cannot tolerate f={f} Byzantine ones (needs n >= 2f + 3 = "
                              f"{2 * f + 3})")
        return f

    def _select(self, mat: torch.Tensor, f: int, m: int) -> tuple[list[int], dict]:
        scores = krum_scores(mat, f)
        order = torch.argsort(scores, stable=True).tolist()
        return sorted(order[:m]), {"f": f, "scores": [round(float(s), 6) for s in scores]}

    def combine(self, mat, w):
        sel, info = self._select(mat, self._f(mat.shape[0]), 1)
        return mat[sel[0]].clone(), sel, info


@register
class MultiKrum(Krum):
    """The weighted mean of the ``m`` updates with the lowest Krum scores."""

    name = "multikrum"
    config_cls = MultiKrumConfig

    def combine(self, mat, w):
        n = mat.shape[0]
        f = self._f(n)
        m = self.cfg.m if self.cfg.m is not None else n - f
        if m > n:
            raise StemmaError(f"multikrum: m={m} is more than the {n} updates")
        sel, info = self._select(mat, f, m)
        ws = torch.zeros_like(w)
        ws[sel] = w[sel]
        if float(ws.sum()) <= 0:
            raise StemmaError("multikrum: every selected update has weight 0")
        return (ws / ws.sum()).float() @ mat, sel, {**info, "m": m}
