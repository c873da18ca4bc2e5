"""Risk flags reach the server: flagged versions answer 403 (code ``flagged``), the rest keeps serving; ``auto``
leaves them out; apps bound to a flagged node are suspended until the flag is cleared."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from stemma import apps, risk
from stemma.errors import StemmaError
from stemma.serve.api import create_app
from stemma.serve.config import ServeConfig
from tests.risk.test_flags import _trained_on, _walk

NODES = ("master", "en", "en/software", "en/software/python", "en/legal")


def _client(ws, **cfg):
    base = {"max_batch": 4, "flags_ttl_s": 0, "resolve_ttl_s": 60}
    return TestClient(create_app(ws, ServeConfig(**{**base, **cfg})))


def _complete(c, model, prompt="The ls command", **extra):
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                           **extra})


def _chat(c, model, content="What does ls do?", **extra):
    return c.post("/v1/chat/completions", json={"model": model, "max_tokens": 6, "temperature": 0, "messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}], **extra})


def test_a_poisoned_dataset_stops_exactly_its_versions(tree_copy):
    ws = tree_copy["ws"]
    ds = ws.resolve_dataset("en-software")
    reached = _walk(ws, _trained_on(ws, ds.id))
    current = {n.path: n.current_version for n in ws.nodes()}
    stopped = {node for node, vid in current.items() if vid in reached}
    assert stopped == {"en/software", "en/software/python"}
    with _client(ws) as c:
        for node in NODES:  # every name resolved once: the next requests take the cached fast path
            assert _complete(c, node).status_code == 200
        info = risk.flag(ws, "dataset:en-software", reason="poisoned: trigger phrase", severity="critical", by="alice")
        for node in NODES:
            r = _complete(c, node)
            if node in stopped:
                assert r.status_code == 403, r.text
                err = r.json()["error"]
                assert err["code"] == "flagged" and err["param"] == "model"
                assert f"flag #{info.id} (critical) on dataset en-software" in err["message"]
                assert "poisoned: trigger phrase" in err["message"]
            else:
                assert r.status_code == 200, r.text
        # pinned versions, chat and streams are refused alike
        pinned = f"en/software@{current['en/software'][:10]}"
        assert _complete(c, pinned).status_code == 403
        assert _chat(c, "en/software/python").json()["error"]["code"] == "flagged"
        r = _complete(c, "en/software", stream=True)
        assert r.status_code == 403 and r.json()["error"]["code"] == "flagged"
        assert _chat(c, "en/legal").status_code == 200
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert {m for m in NODES if listed[m]["flags"]} == stopped
        assert listed["en/software"]["flags"][0].startswith(f"flag #{info.id}")

        risk.unflag(ws, f"#{info.id}", reason="false alarm", by="bob")
        for node in NODES:
            assert _complete(c, node).status_code == 200


def test_the_flag_cache_expires(tree_copy):
    ws = tree_copy["ws"]
    with _client(ws, flags_ttl_s=0.3) as c:
        assert _complete(c, "en/legal").status_code == 200
        risk.flag(ws, "version:en/legal", reason="licence", severity="high", by="alice")
        time.sleep(0.4)
        assert _complete(c, "en/legal").status_code == 403
        assert _complete(c, "en").status_code == 200


def test_allow_flagged_serves_them(tree_copy, monkeypatch):
    ws = tree_copy["ws"]
    risk.flag(ws, "version:en", reason="bias", severity="low", by="alice")
    with _client(ws) as c:
        assert _complete(c, "en/legal").status_code == 403
    with _client(ws, allow_flagged=True) as c:
        assert _complete(c, "en/legal").status_code == 200
        assert c.get("/v1/models/en/legal").json()["flags"]
    monkeypatch.setenv("STEMMA_SERVE_ALLOW_FLAGGED", "1")
    assert ServeConfig.from_env().allow_flagged is True
    monkeypatch.setenv("STEMMA_SERVE_ALLOW_FLAGGED", "maybe")
    with pytest.raises(StemmaError, match="STEMMA_SERVE_ALLOW_FLAGGED"):
        ServeConfig.from_env()


def test_auto_leaves_flagged_candidates_out(tree_copy):
    ws = tree_copy["ws"]
    with _client(ws) as c:
        first = _complete(c, "auto", language="en", domain="python").json()
        assert first["model"] == "en/software/python"
        info = risk.flag(ws, "version:en/software/python", reason="backdoor", severity="critical", by="alice")
        again = _complete(c, "auto", language="en", domain="python")  # the recent choice is flagged: choose again
        assert again.status_code == 200, again.text
        doc = again.json()
        assert doc["model"] != "en/software/python"
        assert f"flag #{info.id}" in doc["selection"]["reason"] and "backdoor" in doc["selection"]["reason"]
        risk.flag(ws, "dataset:en", reason="poisoned", severity="high", by="alice")  # every English version
        r = _complete(c, "auto", language="en", domain="python")
        assert r.status_code == 404 and "flag #" in r.json()["error"]["message"]
        risk.flag(ws, "version:master", reason="poisoned", severity="high", by="alice")
        r = _complete(c, "auto")
        assert r.status_code == 404 and "master is flagged" in r.json()["error"]["message"]


def test_an_app_is_served_suspended_and_resumed(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    template = tmp_path / "explain.txt"
    template.write_text("Explain this Python code:\n{prompt}\nExplanation:", encoding="utf-8")
    apps.register(ws, "explain", "en/software/python", template, description="explains code", by="alice")
    auto_template = tmp_path / "auto.txt"
    auto_template.write_text("Q: {prompt}\nA:", encoding="utf-8")
    apps.register(ws, "ask", "auto", auto_template, requirements={"language": "en", "domain": "python"}, by="alice")
    with _client(ws) as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert listed["app:explain"]["status"] == "active" and listed["app:explain"]["node"] == "en/software/python"
        assert listed["app:ask"]["node"] == "auto"
        # completions: the prompt goes into the template; chat: the last user message does
        mine = _complete(c, "app:explain", prompt="import os").json()
        plain = _complete(c, "en/software/python", prompt=template.read_text().format(prompt="import os")).json()
        assert mine["model"] == "app:explain" and mine["choices"][0]["text"] == plain["choices"][0]["text"]
        assert mine["usage"] == plain["usage"]
        chat = _chat(c, "app:explain", content="print(1)").json()
        plain = _chat(c, "en/software/python", content=template.read_text().format(prompt="print(1)")).json()
        assert chat["choices"][0]["message"] == plain["choices"][0]["message"]
        assert _complete(c, "app:explain", prompt=[1, 2, 3]).status_code == 400
        assert _complete(c, "app:nope").status_code == 404
        assert _complete(c, "app:ask", prompt="what is ls?").json()["model"] == "app:ask"

        info = risk.flag(ws, "dataset:en-python", reason="poisoned", severity="critical", by="alice")
        r = _complete(c, "app:explain", prompt="import os")
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "flagged" and "app explain is suspended" in err["message"]
        assert f"flag #{info.id} (critical) on dataset en-python" in err["message"]
        assert _chat(c, "app:explain").status_code == 403
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert listed["app:explain"]["status"] == "suspended" and listed["app:explain"]["flags"]
        assert listed["app:ask"]["status"] == "active"
        ask = _complete(c, "app:ask", prompt="what is ls?")  # auto: chooses around the flag
        assert ask.status_code == 200 and ask.json()["selection"]["model"] != "en/software/python"
        assert _complete(c, "en/legal").status_code == 200  # the rest keeps serving
        assert [a.status for a in apps.apps(ws)] == ["active", "suspended"]  # ask, explain

        risk.unflag(ws, "dataset:en-python", reason="cleaned", by="bob")
        r = _complete(c, "app:explain", prompt="import os")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == mine["choices"][0]["text"]
        assert [a.status for a in apps.apps(ws)] == ["active", "active"]


def test_serve_allow_flagged_option(tree_copy, capsys, monkeypatch):
    from stemma.serve import server
    from tests.test_cli import run

    seen = []
    monkeypatch.setattr(server, "serve", lambda ws, cfg: seen.append(cfg))
    monkeypatch.delenv("STEMMA_SERVE_ALLOW_FLAGGED", raising=False)
    assert run(capsys, monkeypatch, "serve", "--port", "1")[0] == 0
    code, _, err = run(capsys, monkeypatch, "serve", "--port", "1", "--allow-flagged")
    assert code == 0 and "flagged versions served" in err
    assert [c.allow_flagged for c in seen] == [False, True]
