"""The dashboard's pages: `stemma serve` mounts them beside the OpenAI API, `stemma ui` serves them alone.

Stable URLs: ``/`` (the tree; ``?layer=&language=&domain=`` filter it), ``/node/<path>`` (``?version=<prefix>``
for an older version), ``/playground`` and ``/live``. Pages are rendered on the server from Jinja2 templates
(autoescaped) shipped in the package; the two small scripts in ``static/`` stream the playground's completion
from ``/v1/completions`` and poll ``/metrics`` for the live page. Nothing is fetched from elsewhere, and no page
needs the admin token. Registry reads run in a worker thread, off the server's event loop.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined

from ..workspace import Workspace
from . import data
from .graph import BOX_H, BOX_W

STATIC = Path(__file__).parent / "static"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("stemma.ui", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["mib"] = lambda n: "-" if n is None else f"{n / 2**20:.2f} MiB"
    env.filters["params"] = lambda n: "-" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K")
    env.filters["num"] = lambda x, f=".2f": "-" if x is None else format(x, f)
    env.filters["pct"] = lambda x, f="+.1%": "" if x is None else format(x, f)
    env.globals.update(box_w=BOX_W, box_h=BOX_H)
    return env


def router(ws: Workspace, pool=None) -> APIRouter:
    """The pages over ``ws``; ``pool`` is the serving pool (`stemma serve`), None for `stemma ui` (no models)."""
    env = _environment()
    r = APIRouter()

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(serving=pool is not None, **ctx), status_code=status)

    @r.get("/", response_class=HTMLResponse)
    async def tree(layer: str = "", language: str = "", domain: str = ""):
        t = await run_in_threadpool(data.tree_page, ws, layer, language, domain)
        return page("tree.html", tree=t, title="tree")

    @r.get("/node/{path:path}", response_class=HTMLResponse)
    async def node(path: str, version: str = ""):
        try:
            n = await run_in_threadpool(data.node_page, ws, path.strip("/"), version or None)
        except data.NotFound as e:
            return page("error.html", 404, title="not found", message=str(e))
        return page("node.html", n=n, title=n.path)

    @r.get("/playground", response_class=HTMLResponse)
    async def playground(model: str = ""):
        models = await run_in_threadpool(data.playground_models, ws)
        return page("playground.html", models=models, chosen=model, title="playground")

    @r.get("/live", response_class=HTMLResponse)
    async def live():
        return page("live.html", engines=pool.stats() if pool is not None else [], title="live")

    return r


def mount(app: FastAPI, ws: Workspace, pool=None) -> None:
    """Add the dashboard's pages and static files to ``app``."""
    app.include_router(router(ws, pool))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def create_ui_app(ws: Workspace) -> FastAPI:
    """`stemma ui`: the dashboard alone, read-only, with no model loaded (the playground and live page say that
    serving is not running)."""
    app = FastAPI(title="stemma dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, ws)
    env = _environment()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return HTMLResponse(env.get_template("error.html").render(
            serving=False, title="not found", message=f"no page at {request.url.path}"), status_code=404)

    return app
