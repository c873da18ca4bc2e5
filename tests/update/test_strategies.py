"""Aggregation strategies: exact numbers against numpy, and robustness against the three attacks the tree
must survive (a scaled update, a sign-flipped one, a large random one)."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import numpy as np
import pytest
import torch

from stemma.errors import SpecError, StemmaError
from stemma.update import strategies


def _updates(n: int, seed: int = 0, shapes=((4, 3), (5,))) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{f"w{j}": torch.randn(s, generator=g) for j, s in enumerate(shapes)} for _ in range(n)]


def _flat(d: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([d[k].reshape(-1).numpy() for k in sorted(d)])


def test_fedavg_is_the_weighted_mean():
    ups = _updates(5)
    w = [1.0, 2.0, 3.0, 0.0, 4.0]
    res = strategies.get("fedavg").aggregate(ups, w)
    want = sum(wi * _flat(u) for wi, u in zip(w, ups)) / sum(w)
    np.testing.assert_allclose(_flat(res.delta), want, rtol=1e-5, atol=1e-6)
    assert res.delta["w0"].shape == (4, 3)


@pytest.mark.parametrize("n", [5, 6])
def test_median_and_trimmed_mean_match_numpy(n):
    ups = _updates(n, seed=n)
    mat = np.stack([_flat(u) for u in ups])
    np.testing.assert_allclose(_flat(strategies.get("median").aggregate(ups).delta), np.median(mat, axis=0),
                               rtol=1e-5, atol=1e-6)
    k = int(0.2 * n)
    srt = np.sort(mat, axis=0)
    np.testing.assert_allclose(_flat(strategies.get("trimmed_mean", {"trim": 0.2}).aggregate(ups).delta),
                               srt[k:n - k].mean(axis=0), rtol=1e-5, atol=1e-6)


def _attacked(n_honest=17):
    g = torch.Generator().manual_seed(1)
    direction = {"w": torch.randn(50, generator=g)}
    honest = [{"w": direction["w"] + 0.1 * torch.randn(50, generator=g)} for _ in range(n_honest)]
    attackers = [{"w": honest[0]["w"] * 50}, {"w": -honest[1]["w"]}, {"w": 30 * torch.randn(50, generator=g)}]
    return honest + attackers, direction["w"], set(range(n_honest, n_honest + 3))


def test_krum_and_multikrum_leave_out_the_attackers():
    ups, truth, bad = _attacked()
    res = strategies.get("krum").aggregate(ups)
    assert res.selected[0] not in bad
    multi = strategies.get("multikrum", {"f": 3}).aggregate(ups)
    assert not bad & set(multi.selected) and len(multi.selected) == 17
    assert float((multi.delta["w"] - truth).norm()) < 0.1 * float(truth.norm())
    avg = strategies.get("fedavg").aggregate(ups)
    assert float((avg.delta["w"] - truth).norm()) > float(truth.norm())  # the scaled update drags the mean away


def test_clipping_bounds_every_norm_and_median_clip_tames_fedavg():
    ups, truth, _ = _attacked()
    res = strategies.get("fedavg", {"clip": 1.0}).aggregate(ups)
    assert float(res.delta["w"].norm()) <= 1.0 + 1e-5
    assert set(res.info["clipped"]) == {i for i, u in enumerate(ups) if float(u["w"].norm()) > 1.0}
    med = strategies.get("trimmed_mean", {"clip": "median", "trim": 0.2}).aggregate(ups)
    assert med.info["clip"] == pytest.approx(float(np.median([float(u["w"].norm()) for u in ups])), rel=1e-5)
    assert float((med.delta["w"] - truth).norm()) < 0.3 * float(truth.norm())


def test_bad_input_and_settings():
    with pytest.raises(SpecError, match="unknown aggregation strategy"):
        strategies.get("mean-ish")
    with pytest.raises(SpecError, match="unknown setting"):
        strategies.get("median", {"trim": 0.1})
    with pytest.raises(SpecError, match="trim"):
        strategies.get("trimmed_mean", {"trim": 0.6})
    with pytest.raises(SpecError, match="clip"):
        strategies.get("fedavg", {"clip": -1.0})
    with pytest.raises(SpecError, match="setting clip"):
        strategies.get("fedavg", {"clip": "sometimes"})
    with pytest.raises(StemmaError, match="no updates"):
        strategies.get("fedavg").aggregate([])
    ups = _updates(3)
    with pytest.raises(StemmaError, match="other weights"):
        strategies.get("fedavg").aggregate([ups[0], {"w0": ups[1]["w0"]}, ups[2]])
    with pytest.raises(StemmaError, match="shape"):
        strategies.get("fedavg").aggregate([ups[0], {**ups[1], "w1": torch.zeros(6)}])
    with pytest.raises(StemmaError, match="update 1 holds NaN"):
        strategies.get("median").aggregate([ups[0], {**ups[1], "w1": torch.full((5,), float("nan"))}])
    with pytest.raises(StemmaError, match="weights"):
        strategies.get("fedavg").aggregate(ups, [1.0, -1.0, 1.0])
    with pytest.raises(StemmaError, match="cannot tolerate"):
        strategies.get("krum", {"f": 2}).aggregate(ups)


@pytest.mark.parametrize("name", strategies.names())
def test_every_strategy_setting_is_documented(name):
    cls = strategies._STRATEGIES[name].config_cls
    documented = set()
    for klass in inspect.getmro(cls):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                documented.add(stmt.target.id)
    assert {f.name for f in dataclasses.fields(cls)} <= documented
