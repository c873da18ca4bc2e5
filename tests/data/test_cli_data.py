"""`stemma data ingest --curate` and `stemma data show`: the datasheet per step, bad input that stores nothing."""

from __future__ import annotations

import json

from ..conftest import CORPUS, write_subset
from ..test_cli import run, snapshot


def test_ingest_with_a_curate_file_and_show_prints_each_step(ws, capsys, monkeypatch, tmp_path):
    src = write_subset(CORPUS / "en-manpages.jsonl", tmp_path / "c" / "en.jsonl", 40, max_chars=2000)
    with open(src, "a") as f:  # one exact copy and one bad line
        f.write(open(src).readline())
        f.write("{oops\n")
    steps = tmp_path / "curate.yaml"
    steps.write_text("- exact_dedup\n- near_dedup: {threshold: 0.8, bands: 9, rows: 13, num_perm: 117}\n")
    code, out, err = run(capsys, monkeypatch, "data", "ingest", src, "--name", "en", "--language", "en",
                         "--curate", steps, "--workers", "1")
    assert code == 0, err
    assert "40 of 41 documents kept" in out
    assert "en.jsonl: partial: 1 line(s) skipped: line 42: not valid JSON" in out
    code, out, _ = run(capsys, monkeypatch, "data", "show", "en")
    assert code == 0
    assert "exact_dedup" in out and "near_dedup" in out and "exact_duplicate 1" in out
    assert "exact_dedup: removed (exact_duplicate)" in out
    code, out, _ = run(capsys, monkeypatch, "data", "show", "en", "--json")
    sheet = json.loads(out)
    assert [s["step"] for s in sheet["datasheet"]["curation"]] == ["exact_dedup", "near_dedup"]
    assert sheet["run"]["executor"] == "local" and all(r["seconds"] >= 0 for r in sheet["run"]["steps"])


def test_a_bad_curate_file_is_one_line_and_stores_nothing(ws, capsys, monkeypatch, tmp_path):
    src = write_subset(CORPUS / "en-manpages.jsonl", tmp_path / "c" / "en.jsonl", 10)
    before = snapshot(ws)
    for text, message in [("- nope\n", "unknown curation step 'nope'"),
                          ("- near_dedup: {threshold: 2}\n", "threshold must be between 0 and 1"),
                          ("[unclosed\n", "not valid YAML")]:
        steps = tmp_path / "curate.yaml"
        steps.write_text(text)
        code, out, err = run(capsys, monkeypatch, "data", "ingest", src, "--name", "en", "--curate", steps)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(ws) == before
