"""The update simulation at test size: 20 signed device updates (3 malicious) through the registry path,
robust aggregation against FedAvg, and a rebase against a retrain (benchmarks/update_sim.py, mode tiny)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("update_sim", ROOT / "benchmarks" / "update_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run("tiny", log=lambda *_: None)


def test_robust_aggregation_improves_the_domain_and_fedavg_degrades(sim):
    r, f = sim["robust"], sim["fedavg"]
    assert r["strategy"] == "multikrum" and f["strategy"] == "fedavg"
    assert r["domain_ppl_change"] < 0, r
    # The update scaled by 50 goes straight into the mean: FedAvg makes the node forget past its gate's
    # allowance (5%) and the gate refuses it; the robust strategy stays within it and is accepted.
    assert f["own_suite_ppl_change"] > 0.05 and not f["accepted_by_gate"], f
    assert r["own_suite_ppl_change"] < min(0.05, f["own_suite_ppl_change"] / 2) and r["accepted_by_gate"], r
    assert f["malicious_kept"] == ["device-17-scaled", "device-18-signflip", "device-19-backdoor"]
    assert len(r["malicious_kept"]) < 3
    assert r["trigger_rate_attacker_alone"] >= 0.5, r  # the backdoor is real: alone, it takes
    assert r["trigger_rate_after"] <= r["trigger_rate_before"] + 0.05
    assert "device-19-backdoor" not in r["malicious_kept"]


def test_rebase_is_cheaper_than_retraining(sim):
    assert sim["master_update_accepted"], sim["master_gate_reasons"]
    assert sim["rebase_steps"] < sim["retrain_steps"]
    assert sim["rebase_cost_ratio"] < 0.5
    assert sim["rebased_ppl"] < sim["new_parent_ppl"]  # the rebased child is still specialised
