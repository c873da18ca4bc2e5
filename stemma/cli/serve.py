"""`stemma serve`: the OpenAI-compatible server over the whole tree, with the dashboard; `stemma ui`: the dashboard."""

from __future__ import annotations

import typer

from ..errors import StemmaError
from .app import app
from .console import err, open_ws


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; non-loopback needs STEMMA_ADMIN_TOKEN."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(None, "--max-batch", help="Sequences decoded together per base model."),
    allow_flagged: bool = typer.Option(False, "--allow-flagged",
                                       help="Serve versions reached by a risk flag (default: refused, 403)."),
    replicas: int = typer.Option(None, "--replicas",
                                 help="Serve from N Ray Serve replicas (each holds engines; requests go to a replica "
                                      "holding their base)."),
    ray_address: str = typer.Option(None, "--ray-address",
                                    help="With --replicas: the Ray cluster to run on (HOST:PORT, ray://HOST:PORT, "
                                         "auto); default: a new local one."),
) -> None:
    """Serve the tree over an OpenAI-compatible HTTP API (every node; adapter children batched over their base)."""
    from ..serve.config import ServeConfig
    from ..serve.server import serve as run_server

    if replicas is None and ray_address:
        raise StemmaError("--ray-address needs --replicas N")
    if replicas is not None and replicas < 1:
        raise StemmaError(f"--replicas {replicas}: at least 1 replica")
    cfg = ServeConfig.from_env(host=host, port=port, max_batch=max_batch, allow_flagged=allow_flagged or None)
    cfg.check_bind()
    ws = open_ws()
    if replicas is not None:
        try:
            from ..serve import replicas as ray_serve
        except ImportError:
            raise StemmaError('--replicas needs Ray Serve: pip install "stemma[ray]"') from None
        if ray_address:
            ray_serve.check_address(ray_address)
    where = f"{replicas} Ray Serve replicas{f' on {ray_address}' if ray_address else ''}" if replicas else "one process"
    err.print(f"serving {ws.settings.home} on http://{host}:{port}/v1 from {where} (admin endpoints "
              f"{'enabled' if cfg.admin_token else 'disabled: no STEMMA_ADMIN_TOKEN'}; flagged versions "
              f"{'served' if cfg.allow_flagged else 'refused'})")
    if replicas is None:
        run_server(ws, cfg)
    else:
        ray_serve.run(ws.settings, cfg, replicas, ray_address)


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
) -> None:
    """The read-only web dashboard of the tree, without loading a model (`stemma serve` serves it too, at /)."""
    import uvicorn

    from ..ui.routes import create_ui_app

    ws = open_ws()
    err.print(f"dashboard of {ws.settings.home} on http://{host}:{port}/ (read-only: no models loaded)")
    uvicorn.run(create_ui_app(ws), host=host, port=port, log_level="warning", access_log=False)
