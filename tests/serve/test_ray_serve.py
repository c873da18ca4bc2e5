"""`stemma serve --replicas 2` on a local Ray cluster, on loopback: the API tests' key cases run against it unchanged
(their `client` is this server), and requests for children of one base land on the replica holding it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from stemma.serve.replicas import REPLICA_HEADER
from stemma.serve.server import free_port
from tests.serve.test_api import (  # noqa: F401 - collected here, run against the Ray Serve application
    TOKEN,
    test_bad_completion_input_is_4xx_with_openai_error,
    test_chat_completion_and_stream,
    test_completion_shape_usage_and_pinned_version,
    test_malformed_json_is_400,
    test_n_prompts_and_token_prompts,
    test_stream_equals_non_stream,
)

pytestmark = pytest.mark.timeout(300)


def _env(home, ray_tmp: str) -> dict:
    env = {**os.environ, "STEMMA_HOME": str(home), "STEMMA_ADMIN_TOKEN": TOKEN, "STEMMA_SERVE_MAX_BATCH": "16",
           "STEMMA_SERVE_MAX_N": "4", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    return env


@pytest.fixture(scope="module")
def ray_url(built_tree):
    """`stemma serve --replicas 2` as a user runs it (its own local Ray cluster), stopped afterwards, also on failure:
    SIGTERM (the server deletes the application and stops Ray), then SIGKILL to whatever of its session is left."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stemma.cli", "serve", "--replicas", "2", "--port", str(port)],
                            env=_env(built_tree["home"], ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the Ray Serve application did not come up"
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session it started (Ray's processes), if any is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_url):
    with httpx.Client(base_url=ray_url, timeout=60) as c:
        yield c


@pytest.fixture
def any_client(client):
    return client


def test_children_of_a_base_land_on_the_replica_holding_it(client):
    """Routing by base (Ray Serve's multiplexing): every request for `en`'s adapter children is answered by one
    replica, while requests naming no model spread over both."""
    seen = set()
    for model in ["en/software", "en/software/python"] * 3:
        r = client.post("/v1/completions", json={"model": model, "prompt": "ls", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        seen.add(r.headers[REPLICA_HEADER])
    assert len(seen) == 1, seen
    holder = seen.pop()
    unrouted = {client.get("/health").headers[REPLICA_HEADER] for _ in range(12)}
    assert len(unrouted) == 2, unrouted  # two replicas answer (all 12 on one: chance 1 in 2048)
    assert holder in unrouted


def test_bad_arguments_fail_in_one_line(built_tree):
    """--replicas 0 and an address nobody answers on: one error line, exit 1, no Ray started."""
    env = _env(built_tree["home"], "/nonexistent")
    for args, says in ((["--replicas", "0"], "--replicas 0"),
                       (["--replicas", "2", "--ray-address", f"127.0.0.1:{free_port()}"], "cannot reach")):
        r = subprocess.run([sys.executable, "-m", "stemma.cli", "serve", *args, "--port", str(free_port())],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], r.stderr


def test_a_body_over_the_limit_is_refused_declared_or_chunked(client):
    """The router reads at most one byte past the limit; the replica's API answers as one process does: 413 for a
    declared length, a 4xx OpenAI error for a chunked body (FastAPI reports the cut-off read as a parse error)."""
    big = b"x" * ((4 << 20) + 1)
    declared = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large", declared.text
    chunked = client.post("/v1/completions", content=(big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)),
                          headers={"content-type": "application/json"})
    assert 400 <= chunked.status_code < 500 and chunked.json()["error"]["message"], chunked.text
    assert client.post("/v1/completions", json={"model": "en", "prompt": "x", "max_tokens": 2}).status_code == 200
