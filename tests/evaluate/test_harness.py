"""lm-evaluation-harness on stemma's versions: the demo task's lm-eval YAML gives stemma's own score, row by row.

The session trees of conftest are trained for a few dozen steps and greedily emit blank lines, which would make
"equal scores" hold trivially (0 == 0). The tree here is built from a random tiny Llama checkpoint (conftest's
`save_hf_checkpoint`, the tokenizer trained on the test corpus) with a LoRA child `en/software`: its greedy text is
varied, stops at different places and runs to the token limit on others, and some prompts are cut to fit its
64-token context, so every difference between the two generation paths shows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from stemma.errors import StemmaError
from stemma.evaluate import harness
from tests.conftest import ROOT, save_hf_checkpoint, tiny_corpus

DEMO = ROOT / "examples" / "demo"
INCLUDE = DEMO / "harness"
TASK = "manpage-name"
N = 12
"""Rows compared (the first ones of the task, on both sides)."""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    from stemma.build import build
    from stemma.spec import load_spec
    from stemma.workspace import Workspace

    d = tmp_path_factory.mktemp("harness-tree")
    tiny_corpus(d)
    # The tokenizer's end-of-text token (id 0) is the model's eos: both generation paths stop on it.
    ckpt = save_hf_checkpoint(d / "ckpt", "llama", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    spec = {"name": "harness", "datasets": {"sw": {"paths": ["corpus/en-manpages.jsonl"], "max_doc_chars": 1500}},
            "nodes": {"master": {"method": "import", "config": {"path": str(ckpt)}},
                      "en/software": {"method": "lora", "dataset": "sw", "parent": "master",
                                      "config": {"steps": 2, "batch_size": 2, "lr": 0.05}}}}
    (d / "stemma.yaml").write_text(yaml.safe_dump(spec))
    old = os.environ.get("STEMMA_HOME")
    os.environ["STEMMA_HOME"] = str(d / "home")
    try:
        ws = Workspace.init(d / "home")
        build(ws, load_spec(d / "stemma.yaml"))
    finally:
        if old is None:
            os.environ.pop("STEMMA_HOME", None)
        else:
            os.environ["STEMMA_HOME"] = old
    return {"home": d / "home"}


@pytest.fixture
def tws(tree, monkeypatch):
    from stemma.workspace import Workspace

    monkeypatch.setenv("STEMMA_HOME", str(tree["home"]))
    return Workspace.open(tree["home"])


def demo_task(limit: int | None = None):
    """The demo tree's `manpage-name` task as its stemma.yaml declares it (optionally its first ``limit`` rows)."""
    from stemma.evaluate.tasks import make_task_spec

    raw = yaml.safe_load((DEMO / "stemma.yaml").read_text())
    entry = next(e for tasks in raw["suites"].values() for e in tasks if e["task"] == TASK)
    cfg = dict(entry["config"], **({"limit": limit} if limit else {}))
    return make_task_spec(TASK, entry["kind"], cfg, DEMO, "test")


def test_harness_score_equals_stemma_score_row_by_row(tws, monkeypatch):
    from stemma.evaluate.runner import Runner, score_task
    from stemma.evaluate.tasks.generation import clean

    spec = demo_task(N)
    v = tws.resolve_version("en/software")
    assert tws.plan(v.id).adapters  # an adapter node: lm-eval loads base + peft=

    class Recording(Runner):
        def generate(self, prompts, max_new_tokens, stop=()):
            self.outputs = super().generate(prompts, max_new_tokens, stop)
            return self.outputs

    runner = Recording(tws, v.id)
    mine = score_task(tws, v.id, spec, runner=runner)
    ours = [clean(o, spec.config.normalize_whitespace) for o in runner.outputs]
    base = Runner(tws, tws.resolve_version("master").id)
    # The adapter changes the text: lm-eval giving the same text means it applied the adapter (peft=).
    assert base.generate([r["prompt"] for r in spec.rows], spec.config.max_new_tokens, spec.config.stop) \
        != runner.outputs

    got = {}
    child = harness._child
    monkeypatch.setattr(harness, "_child", lambda *a: got.setdefault("result", child(*a)))
    theirs = harness.run_harness(tws, "en/software", [TASK], include_path=INCLUDE, limit=N)

    outputs = got["result"]["outputs"][TASK]
    assert outputs == ours  # the same text for every row, before any metric
    assert len(set(ours)) > N // 2 and sum(bool(o) for o in ours) > N // 2  # varied, so equality means something
    assert runner.stats["truncated"] > 0  # some prompts were cut to fit the context, on both sides alike
    assert set(theirs) == {f"harness:{TASK}/chrf", f"harness:{TASK}/bleu"}
    assert mine["chrf"] > 0
    assert theirs[f"harness:{TASK}/chrf"] == pytest.approx(mine["chrf"], abs=1e-9)
    assert theirs[f"harness:{TASK}/bleu"] == pytest.approx(mine["bleu"], abs=1e-9)

    m = next(m for m in tws.metrics_of(v.id) if m.name == f"harness:{TASK}/chrf")
    assert (m.dataset_id, m.split, m.value) == (None, "test", theirs[f"harness:{TASK}/chrf"])
    d = m.details
    assert (d["lm_eval"], d["samples"], d["samples_total"], d["limit"]) == (harness.LM_EVAL_VERSION, N, 64, N)
    assert len(d["config_hash"]) == 64 and len(d["sample_hash"]) == 64 and d["filter"] == "normalised"
    assert d["model_args"] == ["peft", "pretrained", "tokenizer"]
    assert d["examples"] == ours[:3]


def test_demo_harness_files_ask_what_the_stemma_task_asks():
    """The shipped YAML and rows follow the demo stemma.yaml: a change to one without the other fails here."""
    from stemma.evaluate.tasks.generation import GenerationConfig

    spec = demo_task()
    cfg = spec.config
    assert isinstance(cfg, GenerationConfig)
    rows = [json.loads(line) for line in (INCLUDE / f"{TASK}.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["reference"]) for r in rows] == [(r["prompt"], r["reference"]) for r in spec.rows]

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    y = yaml.load((INCLUDE / f"{TASK}.yaml").read_text(), Loader=Loader)
    assert y["task"] == TASK and y["output_type"] == "generate_until"
    assert y["generation_kwargs"] == {"until": list(cfg.stop), "max_gen_toks": cfg.max_new_tokens, "do_sample": False}
    # stemma's defaults that the YAML's helpers implement: whitespace collapsed, case kept, chrF (not chrF++).
    assert (cfg.normalize_whitespace, cfg.lowercase, cfg.chrf_word_order) == (True, False, 0)
    assert y["doc_to_target"] == "!function utils.reference"
    assert [m["metric"] for m in y["metric_list"]] == list(spec.metrics)


def test_bad_input_is_one_line_and_stores_nothing(tws, monkeypatch, tmp_path):
    v = tws.resolve_version("master")
    before = len(tws.metrics_of(v.id))
    with pytest.raises(StemmaError, match=r"include path .*nowhere: no such directory"):
        harness.run_harness(tws, "master", [TASK], include_path=tmp_path / "nowhere")
    with pytest.raises(StemmaError, match="at least one lm-eval task"):
        harness.run_harness(tws, "master", [" ", ""], include_path=INCLUDE)
    with pytest.raises(StemmaError) as e:  # found by the child before the model loads
        harness.run_harness(tws, "master", ["no-such-task"], include_path=INCLUDE)
    assert str(e.value) == f"unknown lm-eval task 'no-such-task': not in {INCLUDE} (tasks there: {TASK})"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(StemmaError, match=r"needs the package lm-eval: pip install 'lm-eval\[hf\]==0\.4\.13'"):
        harness.run_harness(tws, "master", [TASK], include_path=INCLUDE)
    assert len(tws.metrics_of(v.id)) == before
    monkeypatch.setattr(importlib.util, "find_spec", real)
    args = harness.model_args_for(tws, v.id, tmp_path / "export")  # a full version: merged, no peft=
    assert sorted(args) == ["pretrained", "tokenizer"] and (Path(args["pretrained"]) / "config.json").is_file()


def test_metric_names_keep_the_filter_only_when_needed():
    got = {"results": {"t": {"alias": "t", "chrf,normalised": 41.5, "chrf_stderr,normalised": "N/A",
                             "exact_match,strict": 0.25, "exact_match_stderr,strict": 0.1,
                             "exact_match,flexible": 0.5, "sample_len": 8}},
           "configs": {"t": {"validation_split": "dev"}}, "n_samples": {"t": {"original": 10, "effective": 8}},
           "config_hashes": {}, "task_hashes": {}, "higher_is_better": {}}
    rows = {name: (split, value, d["stderr"]) for name, split, value, d in harness.metrics_of(got)}
    assert rows == {"harness:t/chrf": ("dev", 41.5, None),
                    "harness:t/exact_match@strict": ("dev", 0.25, 0.1),
                    "harness:t/exact_match@flexible": ("dev", 0.5, None)}
