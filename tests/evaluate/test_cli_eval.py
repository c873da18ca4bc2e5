"""`stemma eval`, `stemma check`, `stemma tree --metric` and the task scores of `stemma show`."""

from __future__ import annotations

import json

import pytest
import yaml

from stemma.build import build
from stemma.spec import load_spec
from tests.evaluate.test_suites import run, snapshot


def _gate(eval_copy, gate, node="en"):
    spec = yaml.safe_load(eval_copy["spec"].read_text())
    spec["nodes"][node]["release_gate"] = gate
    eval_copy["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))
    build(eval_copy["ws"], load_spec(eval_copy["spec"]))  # records the gate; nothing is trained


def test_eval_scores_a_node_and_a_suite(eval_copy, capsys, monkeypatch):
    ws = eval_copy["ws"]
    en = ws.resolve_version("en")
    for m in list(ws.metrics_of(en.id)):  # forget en's task scores: eval measures them again
        if m.name.startswith("task:"):
            with ws.db.session() as s:
                s.delete(s.get(type(m), m.id))
    code, out, err = run(capsys, monkeypatch, "eval", "en", "--suite", "safety")
    assert code == 0, err
    assert "bias" in out and "sentiment_gap" in out and "offensive_rate" in out and "chrf" not in out
    names = {m.name for m in ws.metrics_of(en.id) if m.name.startswith("task:")}
    assert names == {"task:bias/sentiment_gap", "task:bias/cue_gap", "task:offensive/offensive_rate",
                     "task:offensive/offensive_mean"}
    code, out, _ = run(capsys, monkeypatch, "eval", "en")
    assert code == 0 and "chrf" in out and "perplexity" in out
    before = snapshot(ws)
    code, _, err = run(capsys, monkeypatch, "eval", "en", "--suite", "maths")
    assert code == 1 and "node en has no suite 'maths' (suites: safety, text)" in err and len(err.splitlines()) == 1
    assert snapshot(ws) == before


def test_tree_metric_shows_gain_and_forgetting(eval_copy, capsys, monkeypatch):
    ws = eval_copy["ws"]
    code, out, _ = run(capsys, monkeypatch, "tree", "--metric", "accuracy")
    assert code == 0 and "accuracy on own tasks (vs parent)" in out
    legal_line = next(line for line in out.splitlines() if "│     legal " in line)
    legal, en = ws.resolve_version("en/legal"), ws.resolve_version("en")
    mine = ws.get_metric(legal.id, "task:choice/accuracy", None, next(
        m.split for m in ws.metrics_of(legal.id) if m.name == "task:choice/accuracy"))
    assert f"choice {mine:.4g}" in legal_line
    code, out, _ = run(capsys, monkeypatch, "tree", "--metric", "chrf")
    legal_line = next(line for line in out.splitlines() if "│     legal " in line)
    gen = next(m for m in ws.metrics_of(legal.id) if m.name == "task:gen/chrf")
    parent = ws.get_metric(en.id, "task:gen/chrf", None, gen.split)
    assert f"gen {gen.value:.4g} ({gen.value - parent:+.3g})" in legal_line  # forgetting on the parent's task
    code, _, err = run(capsys, monkeypatch, "tree", "--metric", "rouge")
    assert code == 1 and "unknown metric 'rouge' (task metrics: accuracy, accuracy_norm, bleu" in err


def test_show_lists_task_scores(eval_copy, capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "show", "en/legal")
    doc = json.loads(out)
    assert code == 0 and set(doc["tasks"]) >= {"choice", "choice-noise", "gen", "bias"}
    assert set(doc["tasks"]["choice"]) == {"accuracy", "accuracy_norm"}


def test_check_passes_and_fails_with_one_reason_per_threshold(eval_copy, capsys, monkeypatch):
    from stemma.evaluate.gate import check, judge

    ws = eval_copy["ws"]
    code, out, _ = run(capsys, monkeypatch, "check", "en")
    assert code == 0 and "no release gate declared" in out
    _gate(eval_copy, {"min_scores": {"gen/chrf": 0.0}, "max_offensive_rate": 1.0})
    code, out, err = run(capsys, monkeypatch, "check", "en")
    assert code == 0 and out.count("pass") == 3 and "en: pass (2 thresholds)" in out, out + err
    assert check(ws, "en") == (True, [])

    _gate(eval_copy, {"min_scores": {"gen/chrf": 99.0, "em/exact_match": 0.0},
                      "max_scores": {"ppl/perplexity": 1.0}, "max_bias_gap": 0.5})
    ok, reasons = check(ws, "en")
    en = ws.resolve_version("en")
    chrf = next(m.value for m in ws.metrics_of(en.id) if m.name == "task:gen/chrf")
    assert not ok and len(reasons) == 2
    assert reasons[0] == f"gen/chrf {chrf:.4g} < min 99"
    assert reasons[1].startswith("ppl/perplexity ") and reasons[1].endswith("> max 1")
    code, out, _ = run(capsys, monkeypatch, "check", "en")
    assert code == 1 and out.count("FAIL") == 2 and "en: fail (2 of 4 thresholds)" in out
    assert "pass  em/exact_match 0 >= min 0" in out and "bias/sentiment_gap" in out

    _gate(eval_copy, {"max_ppl_rise": 0.5, "min_scores": {"choice/accuracy": 0.0}}, node="en/legal")
    legal = ws.resolve_version("en/legal")
    ds = ws.version_datasets(en.id)["train"]
    rise = ws.get_metric(legal.id, "perplexity", ds, "test") / ws.get_metric(en.id, "perplexity", ds, "test") - 1
    _, lines = judge(ws, "en/legal")
    assert lines[0].value == pytest.approx(rise) and lines[0].ok == (rise <= 0.5)
    assert lines[0].reason.startswith(f"perplexity rise on the parent's split {rise:+.2%}")


def test_check_of_an_unknown_node_is_one_line(eval_copy, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "check", "fr")
    assert code == 1 and "unknown or unbuilt node 'fr'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,words", [
    (["--harness", "demo", "--include-path", "nowhere"], "lm-eval include path"),
    (["--harness", " "], "--harness needs at least one lm-eval task name"),
])
def test_eval_harness_bad_input_is_one_line(eval_copy, capsys, monkeypatch, args, words):
    before = snapshot(eval_copy["ws"])
    code, _, err = run(capsys, monkeypatch, "eval", "en", *args)
    assert code == 1 and words in err and len(err.strip().splitlines()) == 1
    assert snapshot(eval_copy["ws"]) == before
