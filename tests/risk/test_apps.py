"""Apps: `stemma app register` checks everything before writing one row; `stemma app list` shows the status the
flags give (suspended while a flag reaches the app's node, active again once it is cleared)."""

from __future__ import annotations

import json

import pytest

from stemma import apps
from stemma.errors import StemmaError
from tests.risk.test_cli_risk import _registry
from tests.test_cli import run


@pytest.fixture
def template(tmp_path):
    p = tmp_path / "explain.txt"
    p.write_text("Explain this code ({{literal braces}}):\n{prompt}\nExplanation:", encoding="utf-8")
    return p


def _list(capsys, monkeypatch) -> dict:
    code, out, err = run(capsys, monkeypatch, "app", "list", "--json")
    assert code == 0, err
    return {a["name"]: a for a in json.loads(out)}


def test_register_list_suspend_resume(tree_copy, capsys, monkeypatch, template):
    monkeypatch.setenv("STEMMA_USER", "alice")
    code, out, err = run(capsys, monkeypatch, "app", "register", "explain", "--node", "en/software/python",
                         "--template", template, "--description", "explains code")
    assert code == 0, err
    assert "app explain (app:explain) bound to en/software/python: active" in out
    code, out, err = run(capsys, monkeypatch, "app", "register", "ask", "--node", "auto", "--template", template,
                         "--language", "en", "--domain", "python", "--memory", "300MB", "--latency", "25ms")
    assert code == 0, err
    listed = _list(capsys, monkeypatch)
    assert listed["explain"]["status"] == "active" and listed["explain"]["created_by"] == "alice"
    assert listed["ask"]["node"] == "auto"
    assert listed["ask"]["requirements"] == {"language": "en", "domain": "python", "memory_bytes": 300_000_000,
                                             "latency_ms": 25.0}
    assert apps.render(apps.get(tree_copy["ws"], "explain").template, "x = {1}") == \
        "Explain this code ({literal braces}):\nx = {1}\nExplanation:"

    run(capsys, monkeypatch, "flag", "version:en/software", "--reason", "backdoor", "--severity", "critical")
    listed = _list(capsys, monkeypatch)
    assert listed["explain"]["status"] == "suspended" and "backdoor" in listed["explain"]["flags"][0]["label"]
    assert listed["ask"]["status"] == "active"  # auto: the selector leaves flagged candidates out
    code, out, _ = run(capsys, monkeypatch, "app", "list")
    row = next(line for line in out.splitlines() if "app:explain" in line)
    assert "suspended" in row and "flag #1" in row

    run(capsys, monkeypatch, "unflag", "#1", "--reason", "fixed")
    assert _list(capsys, monkeypatch)["explain"]["status"] == "active"

    # --replace rebinds
    code, out, err = run(capsys, monkeypatch, "app", "register", "explain", "--node", "en/legal", "--template",
                         template, "--replace")
    assert code == 0, err
    assert _list(capsys, monkeypatch)["explain"]["node"] == "en/legal"


def _bad_template(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD = [
    (["bad name!", "--node", "en"], None, "app name"),
    (["1st", "--node", "en"], None, "app name"),
    (["ok", "--node", "no/such"], None, "unknown node"),
    (["ok", "--node", "en", "--language", "en"], None, "apply to --node auto only"),
    (["ok", "--node", "auto", "--language", "xx"], None, "no node for language"),
    (["ok", "--node", "auto", "--domain", "python"], None, "needs its language"),
    (["ok", "--node", "auto", "--memory", "lots"], None, "memory size"),
    (["ok", "--node", "en"], ("missing.txt", None), "cannot read template"),
    (["ok", "--node", "en"], ("latin1.txt", "caf\xe9 {prompt}".encode("latin-1")), "not UTF-8"),
    (["ok", "--node", "en"], ("none.txt", b"no placeholder"), "exactly once"),
    (["ok", "--node", "en"], ("twice.txt", b"{prompt} and {prompt}"), "exactly once"),
    (["ok", "--node", "en"], ("other.txt", b"{prompt} for {user}"), "not {user}"),
    (["ok", "--node", "en"], ("positional.txt", b"{prompt} {}"), "not {}"),
    (["ok", "--node", "en"], ("format.txt", b"{prompt!r}"), "without a conversion"),
    (["ok", "--node", "en"], ("brace.txt", b"{prompt} }"), "literal braces"),
    (["taken", "--node", "en"], None, "exists"),
]


@pytest.mark.parametrize("args,file,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_refused_registers_write_nothing(tree_copy, capsys, monkeypatch, template, tmp_path, args, file, message):
    ws = tree_copy["ws"]
    apps.register(ws, "taken", "en", template, by="alice")
    path = template
    if file is not None:
        name, data = file
        path = tmp_path / name if data is None else _bad_template(tmp_path, name, data)
    before = _registry(ws)
    code, out, err = run(capsys, monkeypatch, "app", "register", *args, "--template", path)
    assert code == 1 and message in err and "Traceback" not in err, err
    assert _registry(ws) == before


def test_templates_are_checked_in_the_library(tmp_path):
    for text in ("{prompt}", "a {prompt} b", "{{x}} {prompt}"):
        apps.check_template(text)
    with pytest.raises(StemmaError, match="exactly once"):
        apps.check_template("")
