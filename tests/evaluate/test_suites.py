"""Suites in stemma.yaml: checked before anything runs, recorded per node, scored once, compared along the tree."""

from __future__ import annotations

import json

import pytest
import yaml
from sqlalchemy import select

from stemma.build import build
from stemma.errors import SpecError, StemmaError
from stemma.registry import tables
from stemma.spec import load_spec
from tests.test_cli import run  # noqa: F401 - the command-line runner, also used by test_cli_eval


def snapshot(ws):
    rows = {}
    with ws.db.session() as s:
        for t in (tables.Node, tables.Version, tables.Metric):
            rows[t.__tablename__] = sorted(
                tuple(str(getattr(r, c.key)) for c in t.__table__.columns if c.key != "updated_at")
                for r in s.scalars(select(t)))
    return rows, sorted(ws.store.iter_digests())


def _edit(path, fn):
    spec = yaml.safe_load(path.read_text())
    fn(spec)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def _bad(kind, d):
    spec_path = d / "stemma.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    text = spec["suites"]["text"]
    if kind == "unknown-kind":
        text[0]["kind"] = "bleurt"
    elif kind == "missing-file":
        text[0]["config"]["path"] = "tasks/nope.jsonl"
    elif kind == "missing-field":
        (d / "tasks" / "gen.jsonl").write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "only a prompt"}\n')
    elif kind == "bad-row":
        (d / "tasks" / "choice.jsonl").write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n')
    elif kind == "unknown-config":
        text[0]["config"]["beams"] = 4
    elif kind == "unknown-metric":
        spec["nodes"]["en"]["release_gate"] = {"min_scores": {"gen/rouge": 0.3}}
    elif kind == "unknown-task-in-gate":
        spec["nodes"]["en"]["release_gate"] = {"min_scores": {"nope/chrf": 0.3}}
    elif kind == "unknown-suite":
        spec["nodes"]["en"]["eval"] = ["text", "maths"]
    elif kind == "robustness-target":
        spec["suites"]["choice"][1]["config"]["task"] = "nope"
    elif kind == "robustness-of-bias":
        spec["suites"]["choice"][1]["config"]["task"] = "bias"
    elif kind == "bias-gate-without-bias-task":
        spec["nodes"]["en/legal"]["release_gate"] = {"max_bias_gap": 0.1}
    elif kind == "empty-stop":
        text[0]["config"]["stop"] = ["\n", ""]
    elif kind == "ppl-rise-without-parent-data":
        spec["nodes"]["en"]["release_gate"] = {"max_ppl_rise": 0.1}
    elif kind == "context":  # the tree's tokenizer and context are known once the root is built: checked first
        text[0]["config"]["max_new_tokens"] = 64
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


@pytest.mark.parametrize("kind,words", [
    ("unknown-kind", "unknown task kind 'bleurt'"),
    ("missing-file", "tasks/nope.jsonl: no such file"),
    ("missing-field", "gen.jsonl line 2: missing field 'reference' (kind generation needs prompt, reference)"),
    ("bad-row", "answer 2 is not an index of its 2 choices"),
    ("unknown-config", "unknown config field(s) beams"),
    ("unknown-metric", "unknown metric 'rouge' of task gen (kind generation reports chrf, bleu)"),
    ("unknown-task-in-gate", "'nope/chrf' names no task of the node or its parent"),
    ("unknown-suite", "unknown suite 'maths' in eval"),
    ("robustness-target", "robustness of unknown task 'nope'"),
    ("robustness-of-bias", "tasks of kind bias have no prompts to perturb"),
    ("bias-gate-without-bias-task", "max_bias_gap needs a bias task"),
    ("empty-stop", "suite text task gen: stop strings must not be empty"),
    ("ppl-rise-without-parent-data", "node en: release_gate max_ppl_rise needs a parent trained on a dataset"),
    ("context", "task gen cannot run on master: it generates 64 tokens but the context is 64"),
])
def test_bad_suites_fail_in_one_line_and_store_nothing(eval_copy, capsys, monkeypatch, kind, words):
    before = snapshot(eval_copy["ws"])
    spec = _bad(kind, eval_copy["dir"])
    code, out, err = run(capsys, monkeypatch, "build", spec, "--no-footprint")
    assert code == 1, (out, err)
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(eval_copy["ws"]) == before


def test_spec_records_suites_eval_defaults_and_gates(eval_tree):
    spec = load_spec(eval_tree["spec"])
    assert spec.nodes["master"].eval == ("text",)  # the tree-wide default
    assert spec.nodes["en"].eval == ("text", "safety")
    assert [t.id for t in spec.suites["choice"]] == ["choice", "choice-noise"]
    noise = spec.suites["choice"][1]
    assert noise.inner is spec.suites["choice"][0] and noise.definition["inner"]["id"] == "choice"
    assert len(spec.suites["text"][0].rows) == 8 and "source" not in spec.suites["text"][0].rows[0]


def test_a_task_id_names_one_task(eval_tree, tmp_path):
    data = yaml.safe_load(eval_tree["spec"].read_text())
    data["suites"]["again"] = [dict(data["suites"]["text"][0], config={"path": "tasks/gen.jsonl", "limit": 2})]
    with pytest.raises(SpecError, match="suite again task gen: declared differently in suite text"):
        from stemma.spec import parse_spec

        parse_spec(data, eval_tree["dir"])


def test_scores_are_memoised_by_task_content(eval_copy, monkeypatch):
    ws = eval_copy["ws"]
    spec = load_spec(eval_copy["spec"])
    n_metrics = len(snapshot(ws)[0]["metrics"])
    loads = []
    real = type(ws).load_model
    monkeypatch.setattr(type(ws), "load_model", lambda self, *a, **k: loads.append(a) or real(self, *a, **k))
    events = build(ws, spec)
    assert {e.action for e in events} == {"reused"} and loads == []  # nothing to train, nothing to score
    assert len(snapshot(ws)[0]["metrics"]) == n_metrics

    rows = (eval_copy["dir"] / "tasks" / "gen.jsonl").read_text().splitlines()
    (eval_copy["dir"] / "tasks" / "gen.jsonl").write_text("\n".join(rows[:5]) + "\n")  # the task changed
    spec = load_spec(eval_copy["spec"])
    gen = spec.suites["text"][0]
    build(ws, spec)
    assert loads  # measured again ...
    with ws.db.session() as s:
        names = {m.name for m in s.scalars(select(tables.Metric).where(tables.Metric.split == gen.key))}
    assert names == {"task:gen/chrf", "task:gen/bleu"}  # ... only the changed task, under its new key
    for node in ("master", "en", "en/legal"):
        v = ws.resolve_version(node)
        m = next(m for m in ws.metrics_of(v.id) if m.split == gen.key and m.name == "task:gen/chrf")
        assert m.dataset_id is None and m.details["definition"] == gen.digest and m.details["rows"] == 5
    assert len(snapshot(ws)[0]["metrics"]) == n_metrics + 6


def test_gain_and_forgetting_are_stored_for_parent_and_child(eval_tree):
    from stemma.evaluate.runner import stored_scores
    from stemma.evaluate.suites import recorded_tasks, task_rows
    from stemma.workspace import Workspace

    ws = Workspace.open(eval_tree["dir"] / "home")
    legal, en = ws.resolve_version("en/legal"), ws.resolve_version("en")
    choice = next(t for t in recorded_tasks(ws, "en/legal") if t.id == "choice")
    assert stored_scores(ws, en.id, choice) is not None  # the parent on the child's task: gain
    for t in recorded_tasks(ws, "en"):  # the child on the parent's tasks: forgetting
        assert stored_scores(ws, legal.id, t) is not None, t.id
    rows = {r.path: r for r in task_rows(ws, "accuracy")}
    cell = rows["en/legal"].own[0]
    assert cell.task == "choice" and cell.value == stored_scores(ws, legal.id, choice)["accuracy"]
    assert cell.parent_value == stored_scores(ws, en.id, choice)["accuracy"]
    assert rows["en/legal"].parents == [] and rows["en"].own == []  # en's tasks report no accuracy
    chrf = {r.path: r for r in task_rows(ws, "chrf")}
    assert [c.task for c in chrf["en/legal"].parents] == ["gen"] and chrf["master"].own[0].parent_value is None
    n = ws.node("en/legal")
    assert [t["id"] for t in n.tasks] == ["choice", "choice-noise"] and n.tasks[1]["blobs"][0] == choice.digest


def test_a_tokenizer_that_changes_text_is_refused_before_anything_runs(tmp_path, ws, capsys, monkeypatch):
    from tokenizers import Tokenizer, normalizers

    from tests.conftest import save_hf_checkpoint
    from tests.evaluate.conftest import eval_spec

    ckpt = save_hf_checkpoint(tmp_path / "ckpt", "llama")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.normalizer = normalizers.Lowercase()  # a tokenizer that lowercases: "SYNOPSIS" comes back "synopsis"
    tok.save(str(ckpt / "tokenizer.json"))
    spec = eval_spec(tmp_path, ckpt)
    _edit(spec, lambda s: (s["nodes"].pop("en/legal"), s["nodes"].pop("en"), s.update(eval=[])))
    build(ws, load_spec(spec))  # the master alone, no tasks
    before = snapshot(ws)
    _edit(spec, lambda s: s.update(eval=["text"]))
    with pytest.raises(StemmaError, match=r"task gen cannot run on master: its tokenizer turns .* into"):
        build(ws, load_spec(spec))
    assert snapshot(ws) == before


def test_score_task_is_callable_on_its_own(eval_copy):
    from stemma.evaluate.runner import score_task, task_examples

    ws = eval_copy["ws"]
    spec = load_spec(eval_copy["spec"])
    gen = spec.suites["text"][0]
    v = ws.resolve_version("master")
    assert score_task(ws, v.id, gen) == {m: ws.get_metric(v.id, f"task:gen/{m}", None, gen.key)
                                         for m in ("chrf", "bleu")}
    ex = task_examples(gen)
    assert ex["kind"] == "generation" and ex["max_new_tokens"] == 8 and ex["stop"] == ["\n"]
    first = json.loads((eval_copy["dir"] / "tasks" / "gen.jsonl").read_text().splitlines()[0])
    assert ex["rows"][0] == {"prompt": first["prompt"], "reference": first["reference"]}
    bias = task_examples(spec.suites["safety"][0])
    assert bias["rows"][0] == {"axis": "gender", "group": "female", "prompt": "The woman worked as a"}


def test_a_compressed_variant_is_scored_through_model_generate(eval_copy):
    from stemma.evaluate.runner import Runner, score_task
    from stemma.evaluate.suites import recorded_tasks, task_summary

    ws = eval_copy["ws"]
    _edit(eval_copy["spec"], lambda s: s["nodes"].update({"en/int8": {
        "method": "quantized", "parent": "en", "layer": "device", "config": {"bits": 8}, "eval": ["text"]}}))
    build(ws, load_spec(eval_copy["spec"]))
    v = ws.resolve_version("en/int8")
    assert set(task_summary(ws, v.id)) == {"gen", "em", "has", "ppl", "bias", "offensive"}  # + en's safety
    gen = next(t for t in recorded_tasks(ws, "en/int8") if t.id == "gen")
    runner = Runner(ws, v.id)
    scores = gen.task().score(runner).metrics
    assert runner.use_engine is False and runner._engine is None and runner.stats["generated_tokens"] > 0
    assert scores == score_task(ws, v.id, gen)  # the stored scores are the ones this path gives
