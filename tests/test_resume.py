"""A build killed with SIGKILL mid-training resumes from its checkpoint and leaves a clean store."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_spec


@pytest.mark.slow
def test_kill_9_mid_training_then_resume(tmp_path):
    spec = tiny_spec(tmp_path, master={"steps": 400, "checkpoint_every_s": 0.5})
    env = {**os.environ, "STEMMA_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "stemma.cli", "build", str(spec), "--node", "master"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = tmp_path / "home" / "work"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if list(work.glob("*/checkpoint/state.json")):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
        time.sleep(1.0)  # let it train past the first checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    from stemma.workspace import Workspace

    ws = Workspace.open(tmp_path / "home")
    assert ws.nodes() == []  # nothing half-registered
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)  # a loaded CI machine
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint at step" in done.stderr
    step = int(done.stderr.split("resuming from checkpoint at step ")[1].split("/")[0])
    assert 0 < step < 400
    assert [n.path for n in ws.nodes()] == ["master"]
    v = ws.resolve_version("master")
    assert v.manifest["train"]["steps"] == 400
    report = ws.fsck()
    assert report.clean, report
    assert not list(work.glob("*/checkpoint*"))  # the work area is cleaned after registration
    fsck = subprocess.run([sys.executable, "-m", "stemma.cli", "fsck"], env=env, capture_output=True, text=True)
    assert fsck.returncode == 0 and "0 corrupt, 0 missing, 0 orphan" in fsck.stdout
