"""A federated round over Flower (flwr): a server process for the node and a process per contributor.

The server names the node's current version in its fit instructions; each client trains an update on its own
data against its own copy of that version and answers with the signed update file (bytes in the fit
metrics); the raw data never leaves the client. The server scans and verifies every answer exactly as
`stemma update submit` does (pickles, unsigned, wrongly signed, unregistered, revoked, replayed, stale or
mismatched updates are refused and stored nowhere), then aggregates the verified ones with the node's gate
strategy and judges the result with the node's gate: the same code as `stemma update aggregate`.

Transport: Flower's gRPC server and client (`flwr.server.start_server`, `flwr.client.start_client`), which
run as plain processes on a host and port. Flower marks them deprecated in favour of its SuperLink and
SuperNode deployment, which packages the app as a project run by `flwr run`; for one round between a parent
and its contributors the direct pair is the smaller moving part. Flower's telemetry is switched off.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from ..errors import StemmaError  # noqa: E402
from ..progress import NullReporter, Reporter  # noqa: E402

MAX_MESSAGE = 1 << 30


def _bypass_proxy_for_loopback(address: str) -> None:
    """gRPC sends traffic through ``http_proxy``/``grpc_proxy`` when they are set, loopback included unless the
    host is listed in ``no_grpc_proxy``/``no_proxy``; a round between processes on one machine must not leave it."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return
    for var in ("no_grpc_proxy", "no_proxy"):
        listed = [h for h in os.environ.get(var, "").split(",") if h]
        if host not in listed:
            os.environ[var] = ",".join([*listed, host])


@dataclass
class FederatedResult:
    accepted: bool
    round_id: str | None
    version: str | None
    refused: list[str]
    reasons: list[str]
    contributors: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run_server(node: str, address: str, clients: int, result_path: Path | None = None, timeout_s: float = 600,
               reporter: Reporter | None = None) -> FederatedResult:
    """Serve one round for ``node``: wait for ``clients`` contributors, aggregate, judge, register."""
    import flwr
    from flwr.common import FitIns, Parameters
    from flwr.server.strategy import Strategy

    from ..workspace import Workspace
    from . import service

    reporter = reporter or NullReporter()
    ws = Workspace.open()
    target = ws.resolve_version(node)
    gate = service.gate_for(ws, node)
    state: dict[str, Any] = {"result": None}
    t0 = time.perf_counter()

    class GatedStrategy(Strategy):
        def initialize_parameters(self, client_manager):
            return Parameters(tensors=[], tensor_type="none")

        def configure_fit(self, server_round, parameters, client_manager):
            if not client_manager.wait_for(clients, timeout=int(timeout_s)):
                raise StemmaError(f"only {client_manager.num_available()} of {clients} contributors connected "
                                  f"within {timeout_s:.0f}s")
            picked = client_manager.sample(num_clients=clients, min_num_clients=clients)
            cfg = {"node": node, "parent": target.id, "round": server_round}
            return [(c, FitIns(parameters, cfg)) for c in picked]

        def aggregate_fit(self, server_round, results, failures):
            refused: list[str] = []
            files, ids, names = [], [], []
            for _, res in results:
                raw = res.metrics.get("update")
                if not isinstance(raw, bytes):
                    refused.append("a client answered without an update file")
                    continue
                try:
                    row = service.submit(ws, raw, "federated update")
                except StemmaError as e:
                    refused.append(str(e))
                    continue
                upd = service.stored_file(ws, row)  # submit refused any parent but the node's current version
                files.append(upd)
                ids.append(row.id)
                names.append(upd.header["contributor"])
            for f in failures:
                refused.append(f"a client failed: {f if isinstance(f, BaseException) else 'no answer'}")
            for r in refused:
                reporter.log(f"[red]refused[/red] {r}")
            if not files:
                state["result"] = FederatedResult(False, None, None, refused, ["no verified update arrived"],
                                                  [], time.perf_counter() - t0)
                return None, {}
            # As `service.aggregate`: one round at a time per node, and only against its current version.
            with ws.node_lock(node, "federated round", log=reporter.log):
                if ws.resolve_version(node).id != target.id:
                    state["result"] = FederatedResult(
                        False, None, None, refused, [f"{node} moved to another version during the round; run it again"],
                        names, time.perf_counter() - t0)
                    return None, {}
                rr = service.run_round(ws, target, files, ids, names, gate, reporter)
            state["result"] = FederatedResult(rr.round.accepted, rr.round.id, rr.version.id if rr.version else None,
                                              refused, list(rr.round.reasons), names, time.perf_counter() - t0)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    _bypass_proxy_for_loopback(address)
    flwr.server.start_server(server_address=address, strategy=GatedStrategy(),
                             config=flwr.server.ServerConfig(num_rounds=1, round_timeout=timeout_s),
                             grpc_max_message_length=MAX_MESSAGE)
    result = state["result"] or FederatedResult(False, None, None, [], ["the round did not complete"], [],
                                                time.perf_counter() - t0)
    if result_path is not None:
        tmp = Path(str(result_path) + ".tmp")
        tmp.write_text(json.dumps(result.to_json(), indent=2))
        tmp.replace(result_path)
    return result


def run_client(address: str, data: Path, key_path: Path, contributor: str, cfg, retries: int = 30) -> None:
    """Join a round: train on ``data`` against the version the server names, answer with the signed update."""
    import flwr
    from flwr.client import NumPyClient

    from ..workspace import Workspace
    from .keys import load_private
    from .local import local_texts, train_update

    key = load_private(key_path)
    train, held = local_texts(data, cfg.heldout_fraction)
    ws = Workspace.open()

    class Contributor(NumPyClient):
        def fit(self, parameters, config):
            from . import bundle

            version = ws.version(str(config["parent"]))  # this contributor's own copy of the parent version
            delta, held_ids, stats = train_update(ws, version, train, held, cfg)
            header = bundle.make_header(node=version.row.node_path, parent=version.id,
                                        tokenizer=version.row.tokenizer, contributor=contributor, kind=cfg.kind,
                                        n_examples=len(train), n_tokens=stats["tokens"], extra={"train": stats})
            raw = bundle.encode(header, delta, held_ids, key)
            return [], len(train), {"update": raw}

    _bypass_proxy_for_loopback(address)
    flwr.client.start_client(server_address=address, client=Contributor().to_client(), insecure=True,
                             grpc_max_message_length=MAX_MESSAGE, max_retries=retries, max_wait_time=120)
