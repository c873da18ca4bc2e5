"""`stemma serve`: the OpenAI-compatible server over the whole tree, with the dashboard; `stemma ui`: the dashboard."""

from __future__ import annotations

import typer

from .app import app
from .console import err, open_ws


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; non-loopback needs STEMMA_ADMIN_TOKEN."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(None, "--max-batch", help="Sequences decoded together per base model."),
    allow_flagged: bool = typer.Option(False, "--allow-flagged",
                                       help="Serve versions reached by a risk flag (default: refused, 403)."),
) -> None:
    """Serve the tree over an OpenAI-compatible HTTP API (every node; adapter children batched over their base)."""
    from ..serve.config import ServeConfig
    from ..serve.server import serve as run_server

    cfg = ServeConfig.from_env(host=host, port=port, max_batch=max_batch, allow_flagged=allow_flagged or None)
    cfg.check_bind()
    ws = open_ws()
    err.print(f"serving {ws.settings.home} on http://{host}:{port}/v1 (admin endpoints "
              f"{'enabled' if cfg.admin_token else 'disabled: no STEMMA_ADMIN_TOKEN'}; flagged versions "
              f"{'served' if cfg.allow_flagged else 'refused'})")
    run_server(ws, cfg)


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
