"""`stemma release` and `stemma verify` from the command line; the licence column of `stemma tree` and `show`."""

from __future__ import annotations

import json

from tests.test_cli import run

from .test_release import key  # noqa: F401 - the fixture


def test_release_verify_tree_and_show(tree_copy, key, capsys, monkeypatch, tmp_path):  # noqa: F811
    out = tmp_path / "rel"
    code, text, err = run(capsys, monkeypatch, "release", "en/software/python", "--key", key[0], "--out", out)
    assert code == 0, err
    assert "released en/software/python@" in text and "GPL-3.0-or-later" in text
    code, text, _ = run(capsys, monkeypatch, "verify", out)
    assert code == 0 and "integrity, not origin" in text and "recorded in this registry as release #1" in text
    code, text, _ = run(capsys, monkeypatch, "verify", out, "--public-key", key[1])
    assert code == 0 and "the given public key" in text

    (out / "tokenizer.json").write_text("{}")
    code, _, err = run(capsys, monkeypatch, "verify", out, "--public-key", key[1])
    assert code == 1 and "tokenizer.json" in err

    code, _, err = run(capsys, monkeypatch, "release", "en/legal", "--key", key[0], "--out", tmp_path / "mit",
                       "--license", "MIT")
    assert code == 1 and "GPL-2.0-or-later from dataset all (trained into master@" in err and "MIT drops it" in err
    assert not (tmp_path / "mit").exists()

    code, text, _ = run(capsys, monkeypatch, "tree")
    assert code == 0 and "licence" in text and "GPL-3.0-or-l" in text
    code, text, _ = run(capsys, monkeypatch, "show", "en/software/python")
    doc = json.loads(text)
    assert doc["licenses"]["implied"] == "GPL-3.0-or-later"
    assert {"copyleft", "attribution", "review"} <= set(doc["licenses"]["kinds"])
