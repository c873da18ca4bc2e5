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
    assert len(res.selected) == 1 and res.selected[0] not in bad
    assert res.info["f"] == 8 and len(res.info["scores"]) == 20
    assert torch.equal(res.delta["w"], ups[res.selected[0]]["w"])  # Krum returns one update as it is
    assert min(res.info["scores"][i] for i in bad) > max(res.info["scores"][i] for i in range(17))
    multi = strategies.get("multikrum", {"f": 3}).aggregate(ups)
    assert not bad & set(multi.selected) and len(multi.selected) == 17
    assert float((multi.delta["w"] - truth).norm()) < 0.1 * float(truth.norm())
    default = strategies.get("multikrum").aggregate(ups)  # f = 8, m = n - f = 12
    assert default.info["m"] == 12 and len(default.selected) == 12 and not bad & set(default.selected)
    avg = strategies.get("fedavg").aggregate(ups)
    assert float((avg.delta["w"] - truth).norm()) > float(truth.norm())  # the scaled update drags the mean away


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_scores_match_the_definition(f):
    ups = _updates(8, seed=5)
    mat = np.stack([_flat(u) for u in ups]).astype(np.float64)
    d = ((mat[:, None, :] - mat[None, :, :]) ** 2).sum(-1)
    want = [np.sort(np.delete(d[i], i))[:8 - f - 2].sum() for i in range(8)]
    res = strategies.get("krum", {"f": f}).aggregate(ups)
    np.testing.assert_allclose(res.info["scores"], want, rtol=1e-5)
    assert res.selected == [int(np.argmin(want))]


def test_multikrum_weights_the_selected_updates():
    ups, _, _ = _attacked()
    w = [float(i + 1) for i in range(len(ups))]
    res = strategies.get("multikrum", {"f": 3, "m": 5}).aggregate(ups, w)
    assert len(res.selected) == 5
    sel = res.selected
    want = sum(w[i] * _flat(ups[i]) for i in sel) / sum(w[i] for i in sel)
    np.testing.assert_allclose(_flat(res.delta), want, rtol=1e-5, atol=1e-6)


def test_chunked_columns_give_the_same_numbers(monkeypatch):
    ups = _updates(7, seed=3, shapes=((30, 11), (13,)))
    want = {name: strategies.get(name).aggregate(ups) for name in ("median", "trimmed_mean", "multikrum")}
    monkeypatch.setattr(strategies, "_CHUNK", 20)  # 2 columns per chunk over 7 rows: many chunks
    for name, res in want.items():
        got = strategies.get(name).aggregate(ups)
        np.testing.assert_allclose(_flat(got.delta), _flat(res.delta), rtol=1e-6, atol=1e-6)
        assert got.selected == res.selected


def test_clipping_bounds_every_norm_and_median_clip_tames_fedavg():
    ups, truth, bad = _attacked()
    norms = [float(u["w"].norm()) for u in ups]
    res = strategies.get("fedavg", {"clip": 1.0}).aggregate(ups)
    assert float(res.delta["w"].norm()) <= 1.0 + 1e-5
    assert set(res.info["clipped"]) == {i for i, x in enumerate(norms) if x > 1.0}
    np.testing.assert_allclose(res.info["norms"], norms, rtol=1e-5)
    np.testing.assert_allclose(res.info["norms_after"], [min(x, 1.0) for x in norms], rtol=1e-5)
    # Clipped inputs really are scaled: fedavg of clipped updates equals the mean of the rescaled vectors.
    want = np.mean([_flat(u) * min(1.0, 1.0 / x) for u, x in zip(ups, norms)], axis=0)
    np.testing.assert_allclose(_flat(res.delta), want, rtol=1e-5, atol=1e-6)
    med = strategies.get("trimmed_mean", {"clip": "median", "trim": 0.2}).aggregate(ups)
    assert med.info["clip"] == pytest.approx(float(np.median(norms)), rel=1e-5)
    assert max(med.info["norms_after"]) == pytest.approx(float(np.median(norms)), rel=1e-5)
    assert bad <= set(med.info["clipped"])  # the scaled and the random one are far above the median
    assert float((med.delta["w"] - truth).norm()) < 0.3 * float(truth.norm())
    avg = strategies.get("fedavg", {"clip": "median"}).aggregate(ups)
    assert float((avg.delta["w"] - truth).norm()) < 0.5 * float(truth.norm())
    plain = strategies.get("median").aggregate(ups)
    assert plain.info["norms_after"] == plain.info["norms"] and "clip" not in plain.info


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
    # An update that leaves a weight alone counts as a zero delta there (a LoRA update next to a full one).
    part = strategies.get("fedavg").aggregate([ups[0], {"w0": ups[1]["w0"]}, ups[2]])
    assert torch.allclose(part.delta["w1"], (ups[0]["w1"] + ups[2]["w1"]) / 3)
    assert torch.allclose(part.delta["w0"], (ups[0]["w0"] + ups[1]["w0"] + ups[2]["w0"]) / 3)
    assert torch.equal(strategies.get("median").aggregate([{"w0": ups[0]["w0"]}, {"w1": ups[1]["w1"]},
                                                          {"w1": ups[2]["w1"]}]).delta["w0"],
                       torch.zeros_like(ups[0]["w0"]))
    with pytest.raises(StemmaError, match="shape"):
        strategies.get("fedavg").aggregate([ups[0], {**ups[1], "w1": torch.zeros(6)}])
    with pytest.raises(StemmaError, match="update 1 holds NaN"):
        strategies.get("median").aggregate([ups[0], {**ups[1], "w1": torch.full((5,), float("nan"))}])
    with pytest.raises(StemmaError, match="weights"):
        strategies.get("fedavg").aggregate(ups, [1.0, -1.0, 1.0])
    with pytest.raises(StemmaError, match="cannot tolerate"):
        strategies.get("krum", {"f": 2}).aggregate(ups)
    with pytest.raises(StemmaError, match="cannot tolerate"):
        strategies.get("krum").aggregate(ups[:2])
    with pytest.raises(StemmaError, match="weights: 2 given for 3"):
        strategies.get("fedavg").aggregate(ups, [1.0, 1.0])
    with pytest.raises(StemmaError, match="sum to 0"):
        strategies.get("fedavg").aggregate(ups, [0.0, 0.0, 0.0])
    with pytest.raises(StemmaError, match="weight 2 is nan"):
        strategies.get("fedavg").aggregate(ups, [1.0, 1.0, float("nan")])
    with pytest.raises(StemmaError, match="update 2 holds NaN or infinite values \\(in w0\\)"):
        strategies.get("fedavg").aggregate([ups[0], ups[1], {**ups[2], "w0": torch.full((4, 3), float("inf"))}])
    with pytest.raises(StemmaError, match="update 0 holds values beyond float32"):
        strategies.get("fedavg").aggregate([{"w": torch.full((2,), 1e300, dtype=torch.float64)}, {"w": torch.ones(2)}])
    with pytest.raises(StemmaError, match="m=9 is more than"):
        strategies.get("multikrum", {"m": 9}).aggregate(_updates(5))
    for name, params, match in [("krum", {"f": -1}, "f must be >= 0"), ("multikrum", {"m": 0}, "m must be >= 1"),
                                ("krum", {"m": 3}, "unknown setting"), ("fedavg", {"clip": True}, "got true"),
                                ("median", {"clip": float("inf")}, "finite"), ("krum", {"f": 1.5}, "setting f"),
                                ("fedavg", [1], "mapping")]:
        with pytest.raises(SpecError, match=match) as e:
            strategies.get(name, params)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", strategies.names())
def test_every_strategy_setting_is_documented(name):
    cls = strategies._STRATEGIES.get(name).config_cls
    documented = set()
    for klass in inspect.getmro(cls):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                documented.add(stmt.target.id)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields <= documented, f"undocumented settings in {name}: {sorted(fields - documented)}"
    assert "clip" in fields  # every strategy can clip
    assert dataclasses.asdict(strategies.get(name, {}).cfg) == {f: None if f != "trim" else 0.2 for f in fields}
