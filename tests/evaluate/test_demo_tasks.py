"""The demo's assistant tasks hold exactly the pairs its sft and dpo nodes hold out of training."""

from __future__ import annotations

import json
from pathlib import Path

from stemma.train.align import AlignConfig, read_pairs, split_pairs

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def _rows(name: str) -> list[dict]:
    with open(DEMO / "tasks" / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_assistant_tasks_are_the_held_out_share_of_the_alignment_sets():
    cfg = AlignConfig()
    assert cfg.template == "chat"
    for pairs, task in (("sft.jsonl", "assistant-answer.jsonl"), ("dpo.jsonl", "assistant-preference.jsonl")):
        kind = pairs.removesuffix(".jsonl")
        train, held = split_pairs(read_pairs(DEMO / "align" / pairs, kind), cfg.heldout_fraction, cfg.template)
        rows = _rows(task)
        assert len(rows) == len(held) > 0
        assert [r["prompt"] for r in rows] == [f"User: {h['prompt'].strip()}\nAssistant:" for h in held]
        trained = {f"User: {t['prompt'].strip()}\nAssistant:" for t in train}
        assert not trained & {r["prompt"] for r in rows}
    for r, h in zip(_rows("assistant-preference.jsonl"), split_pairs(read_pairs(DEMO / "align" / "dpo.jsonl", "dpo"),
                                                                     0.1, "chat")[1]):
        assert r["choices"][r["answer"]] == h["chosen"] and h["rejected"] in r["choices"]
