"""Hostile input against a real uvicorn server: every malformed body answers 4xx with an OpenAI error body, and
the keep-alive connection it came on (and the server) keep serving."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from stemma.serve.api import create_app
from stemma.serve.config import ServeConfig
from stemma.serve.server import ServerThread

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONE = "\udcff"  # a lone surrogate: valid JSON ("\udcff"), no valid UTF-8
BAD_UTF8 = b'"\xff\xfe\xc3"'

COMPLETION = {"model": "en", "prompt": "x", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "en", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "temperature": 0}
COMMON_FIELDS = ["model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "logprobs", "user", "ignore_eos", "language", "domain",
                 "memory_bytes", "latency_ms", "logit_bias", "repetition_penalty", "top_k", "min_p"]
NUMERIC = ["max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "logprobs",
           "memory_bytes", "latency_ms", "repetition_penalty", "top_k", "min_p"]
ENDPOINTS = {
    "/v1/completions": (COMPLETION, COMMON_FIELDS + ["prompt", "echo", "best_of", "suffix"],
                        NUMERIC + ["best_of"]),
    "/v1/chat/completions": (CHAT, COMMON_FIELDS + ["messages", "max_completion_tokens", "top_logprobs"],
                             NUMERIC + ["max_completion_tokens", "top_logprobs"]),
    "/admin/load": ({"model": "nope"}, ["model"], []),
    "/admin/unload": ({"model": "nope"}, ["model"], []),
    "/admin/aggregate": ({"node": "en"}, ["node", "strategy", "strategy_config"], []),
}
# Where a string lies in each body (a path of keys and indices), beyond its top-level string fields.
STRING_PATHS = {
    "/v1/completions": [("model",), ("prompt",), ("prompt", 0), ("stop",), ("stop", 0), ("user",), ("suffix",),
                        ("language",), ("domain",), ("logit_bias", "k")],
    "/v1/chat/completions": [("model",), ("messages", 0, "content"), ("messages", 0, "content", 0, "text"),
                             ("messages", 0, "role"), ("messages", 0, "name"), ("stop",), ("stop", 0), ("user",)],
    "/admin/load": [("model",)],
    "/admin/unload": [("model",)],
    "/admin/aggregate": [("node",), ("strategy",), ("strategy_config", "k"), ("strategy_config", "k", 0)],
}
PLACEHOLDER = "@@PLACEHOLDER@@"


def _put(body: dict, path: tuple, value) -> dict:
    """A deep copy of body with value at path; a list index or a missing key creates what it needs."""
    doc = json.loads(json.dumps(body))
    node = doc
    for k, nxt in zip(path, path[1:]):
        if isinstance(k, int):
            node = node[k]
            continue
        if isinstance(nxt, int):
            if not isinstance(node.get(k), list):
                node[k] = [{"type": "text", "text": "x"}] if k == "content" else ["x"]
        elif not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value
    return doc


def _cases(path: str) -> list[tuple[str, bytes]]:
    base, fields, numeric = ENDPOINTS[path]
    out = []

    def add(name, doc):
        out.append((name, json.dumps(doc).encode() if not isinstance(doc, bytes) else doc))

    for p in STRING_PATHS[path]:
        add(f"surrogate {p[0]} {p}", _put(base, p, LONE))
        add(f"surrogate {p[0]} in {p}", _put(base, p, f"ok {LONE} ok"))
        add(f"bad utf-8 {p}", json.dumps(_put(base, p, PLACEHOLDER)).encode().replace(
            f'"{PLACEHOLDER}"'.encode(), BAD_UTF8))
    add("surrogate key", {**base, LONE: 1})
    for f in fields:
        for wrong in ({"x": [1]}, [1.5, "a"], "ten" if f in numeric else 1.5):
            add(f"{f}={wrong!r}", {**base, f: wrong})
    for f in numeric:
        for huge in (10**40, -(10**40), 1e308, -1e308):
            add(f"{f}={huge}", {**base, f: huge})
        raw = json.dumps({**base, f: PLACEHOLDER}).encode()
        add(f"{f}=1e999", raw.replace(f'"{PLACEHOLDER}"'.encode(), b"1e999"))
        add(f"{f}=5000 digits", raw.replace(f'"{PLACEHOLDER}"'.encode(), b"9" * 5000))
    first = next(iter(base))
    for depth in (400, 100_000):
        raw = json.dumps({**base, first: PLACEHOLDER}).encode()
        add(f"nested {depth}", raw.replace(f'"{PLACEHOLDER}"'.encode(), b"[" * depth + b"]" * depth))
        add(f"nested objects {depth}", raw.replace(f'"{PLACEHOLDER}"'.encode(),
                                                   b'{"a":' * depth + b"1" + b"}" * depth))
    add("10 MB", {**base, first: "a" * 10_000_000})
    add("unknown field", {**base, "frobnicate": True})
    add("not an object", [base])
    add("invalid utf-8 body", b"\xff\xfe\x00{")
    return out


def _addr(r: httpx.Response):
    """The client end of the connection a response came on; None once that connection is closed."""
    try:
        return r.extensions["network_stream"].get_extra_info("client_addr")
    except OSError:
        return None


def _check(c: httpx.Client, port_of: dict, name: str, method_path: str, content: bytes, headers: dict) -> str | None:
    """None if the answer is a 4xx with an OpenAI error body on the connection already in use, else what was wrong."""
    try:
        r = c.post(method_path, content=content, headers={"content-type": "application/json", **headers})
    except httpx.HTTPError as e:
        port_of["last"] = name
        return f"{name}: {type(e).__name__}: {e}"
    where = _addr(r)
    dropped, port_of["addr"] = where != port_of["addr"], where
    problems = []
    if not 400 <= r.status_code < 500:
        problems.append(f"HTTP {r.status_code}")
    elif m := re.search(r" surrogate (\w+) ", name):  # 400 naming the field, never silently replaced
        field = m.group(1)
        if r.status_code != 400 or r.json().get("error", {}).get("param") != field:
            problems.append(f"HTTP {r.status_code} {r.text[:200]!r}, not 400 naming {field}")
    try:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert set(err) == {"message", "type", "param", "code"}
        assert "\n" not in err["message"] and len(err["message"]) < 1000
    except Exception:
        problems.append(f"not an OpenAI error body: {r.text[:200]!r}")
    if where is None or r.headers.get("connection", "").lower() == "close":
        problems.append("the connection was closed")
    if dropped:  # this request came on a new connection: the previous answer dropped the one in use
        problems.append(f"(the connection was dropped after {port_of.get('last')})")
    port_of["last"] = name
    return f"{name}: {', '.join(problems)}" if problems else None


@pytest.fixture
def live(tree_copy):
    app = create_app(tree_copy["ws"], ServeConfig(admin_token=TOKEN, max_batch=8))
    with ServerThread(app) as url:
        yield url


def test_hostile_bodies_are_4xx_and_the_connection_survives(live):
    failures = []
    with httpx.Client(base_url=live, timeout=60) as c:
        port_of: dict = {"last": "a good request"}
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        port_of["addr"] = _addr(c.post("/v1/completions", json=COMPLETION))
        for path in ENDPOINTS:
            auths = [{}] if path.startswith("/v1/") else [{}, AUTH, {"Authorization": b"Bearer \xff\xfe"}]
            for headers in auths:
                for name, content in _cases(path):
                    bad = _check(c, port_of, f"{path} {'token ' if headers else ''}{name}", path, content, headers)
                    if bad:
                        failures.append(bad)
        for headers in ({}, AUTH):
            for content in (b"", b"\xff\xfe", json.dumps({"a": LONE}).encode(), b"\x00" * 10_000_000):
                bad = _check(c, port_of, f"/admin/updates {len(content)} bytes", "/admin/updates", content, headers)
                if bad:
                    failures.append(bad)
        assert not failures, f"{len(failures)} hostile bodies mishandled:\n" + "\n".join(failures[:80])
        r = c.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200 and _addr(r) == port_of["addr"]
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.get("/health").json()["status"] == "ok"
