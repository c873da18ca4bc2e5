"""Running the API under uvicorn: in the foreground (`stemma serve`) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import StemmaError
from .config import ServeConfig


def serve(ws, cfg: ServeConfig) -> None:
    """Serve until interrupted. Refuses a non-loopback bind without an admin token."""
    import uvicorn

    from .api import create_app

    cfg.check_bind()
    uvicorn.run(create_app(ws, cfg), host=cfg.host, port=cfg.port, log_level="info", access_log=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server on loopback in a daemon thread; ``with ServerThread(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="stemma-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StemmaError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
