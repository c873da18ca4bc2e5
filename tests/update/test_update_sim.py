"""The update simulation at test size: 21 signed device updates (6 malicious: scaled, sign-flipped, a boosted
backdoor, three Sybils sending one poisoned update) through the registry path, robust aggregation against
FedAvg; replayed, stale and revoked updates at the master; a rebase against a retrain (benchmarks/update_sim.py,
mode tiny)."""

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
    # The update scaled by 50 and the boosted backdoor go straight into the mean: FedAvg makes the node forget
    # past its gate's allowance (5%) and the gate refuses it; the robust strategy stays within it and is accepted.
    assert f["own_suite_ppl_change"] > 0.05 and not f["accepted_by_gate"], f
    assert r["own_suite_ppl_change"] < min(0.05, f["own_suite_ppl_change"] / 2) and r["accepted_by_gate"], r
    # Everything admitted reaches FedAvg's mean: the first Sybil copy among them, the other two were refused.
    assert f["malicious_kept"] == ["device-15-scaled", "device-16-signflip", "device-17-boosted", "device-18-sybil"]
    assert len(r["malicious_kept"]) < len(f["malicious_kept"])


def test_boosted_backdoor_survives_fedavg_not_the_robust_strategy(sim):
    r, f = sim["robust"], sim["fedavg"]
    assert r["trigger_rate_attacker_alone"] >= 0.5, r  # the backdoor is real: alone, it takes
    assert f["trigger_rate_before"] == r["trigger_rate_before"] <= 0.05
    # Scaled by n / server_lr, it goes whole into FedAvg's mean (model replacement), and with the first Sybil copy
    # of it; median-norm clipping and multikrum keep neither, and the robust node does not learn the trigger.
    # (FedAvg's own trigger rate is reported, not asserted: the update scaled by 50 in the same mean wrecks the
    # model, so whether its garbage happens to contain the trigger varies from run to run: 8-50% measured.)
    assert {n.rsplit("-", 1)[-1] for n in f["malicious_kept"]} >= {"boosted", "sybil"}, f
    assert not {n.rsplit("-", 1)[-1] for n in r["malicious_kept"]} & {"boosted", "sybil"}, r
    assert r["trigger_rate_after"] <= r["trigger_rate_before"] + 0.05, r


def test_sybil_copies_replays_stale_and_revoked_updates_are_refused_at_submission(sim):
    sybils = sim["refused_at_submit"]
    assert sorted(sybils) == ["device-19-sybil", "device-20-sybil"], sybils
    assert all("identical to update" in why and "from device-18-sybil" in why for why in sybils.values())
    master = sim["master_refused_at_submit"]
    assert sorted(master) == ["site-0 (replayed after the round)", "site-5 (revoked key)",
                              "site-6 (made against the previous master)"], master
    assert "replay: this file was already submitted" in master["site-0 (replayed after the round)"]
    assert "site-5's key for master was revoked" in master["site-5 (revoked key)"]
    assert "master has moved on" in master["site-6 (made against the previous master)"]
    # The update the stolen key sent before its revocation is marked revoked and left out of the round.
    (left,) = sim["master_left_out"]
    assert left.endswith("by site-5: revoked"), left


def test_rebase_is_cheaper_than_retraining(sim):
    assert sim["master_update_accepted"], sim["master_gate_reasons"]
    assert sim["rebase_steps"] < sim["retrain_steps"]
    assert sim["rebase_cost_ratio"] < 0.5
    assert sim["rebased_ppl"] < sim["new_parent_ppl"]  # the rebased child is still specialised
