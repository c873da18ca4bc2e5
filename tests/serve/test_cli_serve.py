"""`stemma serve` as a user runs it: a real process, refusing an unsafe bind, serving on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from stemma.serve.config import ServeConfig, is_loopback
from stemma.serve.server import free_port


def _env(home) -> dict:
    env = {**os.environ, "STEMMA_HOME": str(home)}
    env.pop("STEMMA_ADMIN_TOKEN", None)
    return env


def test_refuses_non_loopback_without_token(built_tree):
    r = subprocess.run([sys.executable, "-m", "stemma.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                       env=_env(built_tree["home"]), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "STEMMA_ADMIN_TOKEN" in r.stderr and "0.0.0.0" in r.stderr


def test_bind_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    ServeConfig(host="0.0.0.0", admin_token="t").check_bind()


def test_serves_on_loopback_and_stops(built_tree):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stemma.cli", "serve", "--port", str(port)],
                            env=_env(built_tree["home"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert r.json()["status"] == "ok"
        c = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "en/software/python", "prompt": "import", "max_tokens": 4}, timeout=60)
        assert c.status_code == 200 and c.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
