"""`stemma serve --replicas N`: the same OpenAI API (`api.create_app`) as a Ray Serve application.

```
HTTP ──Ray Serve proxy──▶ Router (the ingress): body ──api.base_of──▶ base version id
   │ DeploymentHandle.options(multiplexed_model_id=<base id>, stream=True): Ray Serve sends the request to a
   │ replica that holds that base (else to the one holding fewest), so an adapter child runs where its base is
   ▼
Replica × N: `create_app(ws, cfg)` of its own (ModelPool, engines, scheduler thread), called in-process as an ASGI
   app; `@serve.multiplexed` loads the base's engine (adapters go to that engine's own bank); the ASGI messages
   (status + headers, then body chunks as they come) stream back through the router to the client unchanged
```

The API has one implementation: the replicas run `api.py` itself, so status codes, error bodies and SSE streams are
the single-process server's, byte for byte. Every response carries ``x-stemma-replica`` (the replica that
answered); ``/health`` and ``/metrics`` are the answering replica's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from ray import serve
from starlette.responses import JSONResponse, Response

from ..errors import StemmaError
from ..settings import Settings
from .config import ServeConfig

log = logging.getLogger("stemma.serve")

APP_NAME = "stemma"
REPLICA_HEADER = "x-stemma-replica"
BASES_PER_REPLICA = 4
"""Bases a replica reports to Ray Serve's router as held (``max_num_models_per_replica``); what stays in memory is
still the replica's memory budget (`ModelPool`)."""


# ---------------------------------------------------------------------- one HTTP request, in-process
def _request(request, body: bytes) -> dict:
    """What a replica needs of a Starlette request to run it as ASGI again: plain data, so Ray can send it."""
    s = request.scope
    return {"method": s["method"], "path": s["path"], "raw_path": s.get("raw_path") or s["path"].encode(),
            "query_string": s.get("query_string", b""), "headers": list(s["headers"]), "client": s.get("client"),
            "server": s.get("server"), "scheme": s.get("scheme", "http"), "http_version": s.get("http_version", "1.1"),
            "body": body}


async def _run_asgi(app, req: dict, extra_headers: list[tuple[bytes, bytes]]) -> AsyncIterator[dict]:
    """Run one request through an ASGI app; yield its response messages as it sends them.

    The app reads the whole body at once; afterwards ``receive`` waits, and answers ``http.disconnect`` once the
    consumer stops (the client went away and Ray cancelled the call, or the response ended), so the API cancels
    the request's sequences exactly as it does for a client of uvicorn.
    """
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "root_path": "",
             **{k: v for k, v in req.items() if k != "body"}}
    sent: asyncio.Queue[dict | BaseException | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": req["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
            await sent.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await sent.put(e)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if isinstance(message, BaseException):
                raise message
            yield message
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()


# ---------------------------------------------------------------------- the deployments
class Replica:
    """One replica: the whole API over its own pool of engines."""

    def __init__(self, settings: Settings, cfg: ServeConfig):
        from ..workspace import Workspace
        from .api import create_app

        self.app = create_app(Workspace(settings), cfg)
        self.pool = self.app.state.pool
        self.header = [(REPLICA_HEADER.encode(), serve.get_replica_context().replica_tag.encode())]

    @serve.multiplexed(max_num_models_per_replica=BASES_PER_REPLICA)
    async def base(self, base_id: str):
        """The engine of a base (loaded on first use). Through ``serve.multiplexed`` Ray Serve knows this replica
        holds the base and sends the requests for it and its adapter children here."""
        from fastapi.concurrency import run_in_threadpool

        return await run_in_threadpool(lambda: self.pool.engine(self.pool.target(base_id)))

    async def respond(self, req: dict) -> AsyncIterator[dict]:
        """One HTTP request (`_request`) -> its ASGI response messages, streamed."""
        base_id = serve.get_multiplexed_model_id()
        if base_id:
            try:
                await self.base(base_id)
            except Exception:  # noqa: BLE001 - the endpoint meets the same error (memory budget) and answers it
                log.debug("loading base %s failed", base_id, exc_info=True)
        async for message in _run_asgi(self.app, req, self.header):
            yield message

    def __del__(self):
        self.pool.close()


class Router:
    """The ingress: reads the request, finds its base (`api.base_of`) and streams the chosen replica's answer."""

    def __init__(self, settings: Settings, cfg: ServeConfig, replicas):
        from ..workspace import Workspace
        from .pool import ModelPool

        self.cfg = cfg
        self.pool = ModelPool(Workspace(settings), cfg)  # names only: the router never loads an engine
        self.replicas = replicas.options(stream=True)

    async def __call__(self, request):
        from .api import base_of, body_limit, error_body

        body = await _bounded_body(request, body_limit(self.cfg, request.url.path))
        base_id = await base_of(self.pool, request.url.path, body)
        handle = self.replicas.options(multiplexed_model_id=base_id) if base_id else self.replicas
        messages = handle.respond.remote(_request(request, body))
        try:
            start = await messages.__anext__()
        except asyncio.CancelledError:  # the client went away before the answer began: so does the replica's call
            messages.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - a replica died or failed before answering: the client gets a 500
            log.error("no replica answered %s: %s", request.url.path, e)
            return JSONResponse(error_body("no replica answered the request", "server_error"), status_code=500)
        return _Relayed(start, messages)

    def __del__(self):
        self.pool.close()


async def _bounded_body(request, limit: int | None) -> bytes:
    """The body, read up to one byte past ``limit``: the replica's API answers 413 for it as for the whole body
    (a declared length over the limit sends none), and the router never holds more than that."""
    length = request.headers.get("content-length")
    if limit is not None and length is not None and (not length.isdigit() or int(length) > limit):
        return b""
    out = bytearray()
    async for chunk in request.stream():
        out += chunk
        if limit is not None and len(out) > limit:
            break
    return bytes(out)


class _Relayed(Response):
    """A replica's ASGI messages sent on as they come (Ray Serve sends a returned Response by calling it)."""

    def __init__(self, start: dict, rest):
        self.start, self.rest = start, rest  # no Response.__init__: nothing here is rendered

    async def __call__(self, scope, receive, send):
        try:
            await send(self.start)
            async for message in self.rest:
                await send(message)
        finally:
            self.rest.cancel()  # the client went away mid-stream: the replica cancels the request's sequences


def deployments(settings: Settings, cfg: ServeConfig, replicas: int):
    """The Ray Serve application: a router and ``replicas`` replicas, each asking Ray for one CPU."""
    quiet = {"enable_access_log": False}  # as uvicorn runs for one process: /metrics counts the requests
    replica = serve.deployment(Replica, name="replica", num_replicas=replicas, ray_actor_options={"num_cpus": 1},
                               max_ongoing_requests=cfg.max_batch * 4, logging_config=quiet)
    router = serve.deployment(Router, name="router", num_replicas=1, ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=cfg.max_batch * 4 * replicas, logging_config=quiet)
    return router.bind(settings, cfg, replica.bind(settings, cfg))


# ---------------------------------------------------------------------- stemma serve --replicas N
def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a Ray address that no server answers on, in one line, before anything starts (``auto`` and an
    address without a port are left to Ray)."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise StemmaError(f"--ray-address {address!r} is not HOST:PORT or ray://HOST:PORT") from None
    if not host or port is None:
        raise StemmaError(f"--ray-address {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise StemmaError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def run(settings: Settings, cfg: ServeConfig, replicas: int, address: str | None = None) -> None:
    """Serve with Ray Serve until interrupted: on a new local Ray cluster, or on the one at ``address``.

    The caller has checked ``replicas`` >= 1 and the address (`check_address`); a cluster with fewer CPUs than
    replicas is refused before anything is deployed. On the way out the application is deleted (a shared cluster
    keeps running) and a local cluster stops.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # room for every replica, whatever the machine's cores
            ray.init(num_cpus=max(replicas, os.cpu_count() or 1), include_dashboard=False,
                     logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - Ray's many connection errors, in one line
        ray.shutdown()
        raise StemmaError(f"cannot start Ray{f' at {address}' if address else ''}: {str(e).splitlines()[0]}") from None

    def stop(signum, frame):  # SIGTERM ends the server as Ctrl-C does, through the clean-up below (set after
        raise KeyboardInterrupt  # ray.init, whose own handler ends the process before any clean-up)

    signal.signal(signal.SIGTERM, stop)
    deployed = False
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < replicas:
            raise StemmaError(f"the Ray cluster has {cpus:g} CPUs; --replicas {replicas} needs one each")
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        deployed = True
        serve.run(deployments(settings, cfg, replicas), name=APP_NAME, route_prefix="/")
        log.info("serving with %d replicas", replicas)
        while True:
            time.sleep(3600)
    finally:
        try:
            if deployed and address:
                serve.delete(APP_NAME)
            elif deployed:
                serve.shutdown()
        finally:
            ray.shutdown()
