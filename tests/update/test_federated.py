"""A federated round over Flower with real processes on loopback: a server for the node, three contributors
(one of them not registered), the same verification, strategy and gate as the registry path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from stemma.update import keys, service

from .test_updates import _local_data, _set_gate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_federated_round_over_flower_processes(tree_copy, tmp_path):
    ws = tree_copy["ws"]
    node = "en/software"
    _set_gate(tree_copy, node, {"strategy": "median", "min_contributors": 2, "max_own_rise": 0.5,
                                "max_child_rise": 0.5})
    people = []
    for i, name in enumerate(["clinic-a", "clinic-b", "intruder"]):
        k = tmp_path / f"{name}.key"
        pub = keys.generate(k)
        if name != "intruder":
            service.register_contributor(ws, node, name, pub)
        people.append((name, k, _local_data(tmp_path, i)))
    before = ws.resolve_version(node).id
    address = f"127.0.0.1:{_free_port()}"
    # gRPC honours proxy variables; a proxy that does not exist proves the loopback round never goes through one.
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "no_grpc_proxy")}
    env.update({"STEMMA_HOME": str(tree_copy["home"]), "FLWR_TELEMETRY_ENABLED": "0",
                "grpc_proxy": "http://192.0.2.1:3128", "http_proxy": "http://192.0.2.1:3128"})
    cli = [sys.executable, "-m", "stemma.cli", "update"]
    result = tmp_path / "round.json"
    # Each process writes to its own log file: a pipe nobody reads fills up and blocks the writer.
    logs = {name: tmp_path / f"{name}.log" for name in ["server", *(p[0] for p in people)]}
    handles = {name: open(path, "w") for name, path in logs.items()}
    server = subprocess.Popen(cli + ["federated-server", node, "--address", address, "--clients", "3",
                                     "--timeout", "120", "--result", str(result)],
                              env=env, stdout=handles["server"], stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen(cli + ["federated-client", "--server", address, "--data", str(data), "--key",
                                       str(k), "--contributor", name, "--steps", "8", "--lr", "0.003"],
                                env=env, stdout=handles[name], stderr=subprocess.STDOUT, text=True)
               for name, k, data in people]
    timed_out = False
    try:
        server.wait(timeout=300)
        for c in clients:
            c.wait(timeout=60)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
        for h in handles.values():
            h.close()
    err = "\n".join(f"--- {name}\n{path.read_text()[-1500:]}" for name, path in logs.items())
    assert not timed_out, "the federated round did not finish in time\n" + err
    assert result.is_file(), err
    res = json.loads(result.read_text())
    assert sorted(res["contributors"]) == ["clinic-a", "clinic-b"]
    assert len(res["refused"]) == 1 and "intruder" in res["refused"][0] and "not registered" in res["refused"][0]
    assert server.returncode == (0 if res["accepted"] else 2), err
    rounds = service.rounds(ws, node)
    assert [r.id for r in rounds] == [res["round_id"]]
    assert rounds[0].strategy == "median" and len(rounds[0].update_ids) == 2
    if res["accepted"]:
        assert ws.resolve_version(node).id == res["version"] != before
    # The intruder's update is stored nowhere; the two verified ones are, and fsck is clean.
    assert len(service.updates(ws, node)) == 2
    assert ws.fsck().clean
