"""The dashboard in a real browser: Playwright drives Debian's ``chromium`` against `stemma serve` (API and pages in
one server) on a private copy of the session variant tree, and against a real `stemma ui` process.

Each page is saved as a screenshot under a temporary directory, or under ``STEMMA_UI_SCREENSHOTS``:
``STEMMA_UI_SCREENSHOTS=docs`` writes the copies the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stemma import risk

PHONE = {"width": 390, "height": 844}
WIDE = {"width": 1280, "height": 900}
PROMPT = "The ls command lists"

browser_test = pytest.mark.timeout(90, func_only=True)  # the tree fixtures take longer; a test itself must not


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright (Playwright's own browser download is not used)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; ./run test installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("STEMMA_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def site(variant_tree, tmp_path_factory):
    """`stemma serve` (the OpenAI API with the dashboard at /) on a private copy of the variant tree."""
    from stemma.serve.api import create_app
    from stemma.serve.config import ServeConfig
    from stemma.serve.server import ServerThread
    from stemma.workspace import Workspace

    d = tmp_path_factory.mktemp("ui") / "tree"
    shutil.copytree(variant_tree["dir"], d, symlinks=True)
    ws = Workspace.open(d / "home")
    app = create_app(ws, ServeConfig(max_batch=4, flags_ttl_s=0))
    with ServerThread(app) as url:
        yield {"url": url, "ws": ws, "home": d / "home"}


@pytest.fixture
def page(browser, request):
    """A fresh page, wide unless the test asks for ``phone``."""
    ctx = browser.new_context(viewport=PHONE if "phone" in request.node.name else WIDE)
    p = ctx.new_page()
    p.set_default_timeout(20_000)
    yield p
    ctx.close()


def _run_prompt(page, model: str) -> None:
    page.select_option("#model", model)
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "32")  # the tiny models' context is 64 tokens
    page.click("#run")


@browser_test
def test_the_tree_links_to_a_node_and_its_lineage(site, page, shots):
    page.goto(site["url"] + "/")
    nodes = page.locator("svg#tree a.node")
    assert nodes.count() == len(site["ws"].nodes())
    page.screenshot(path=shots / "dashboard-tree.png", full_page=True)
    page.click('svg#tree a[data-node="en/software/python"]')
    page.wait_for_url("**/node/en/software/python")
    assert page.inner_text("#node-name") == "en/software/python"
    chain = site["ws"].chain(site["ws"].node("en/software/python").current_version)
    links = page.locator("#lineage ol.chain li")
    assert links.count() == len(chain) == 4
    for li, v in zip(links.all(), chain):  # master first, each with its relation and content hash
        text = li.inner_text()
        assert v.row.node_path in text and v.short in text and v.row.relation in text
    assert page.locator("#tradeoff svg.plot").count() == 2  # size and speed vs perplexity
    assert page.locator("#tradeoff .dot.on-front").count() >= 1
    page.screenshot(path=shots / "dashboard-node.png", full_page=True)


@browser_test
def test_the_tree_filters_by_layer_and_language(site, page):
    page.goto(site["url"] + "/")
    page.select_option("select[name=layer]", "device")
    page.click("form.filters button")
    page.wait_for_url("**/?layer=device*")
    rows = page.locator("#nodes tbody tr")
    assert rows.count() == 5 and all("/python/" in r.inner_text() for r in rows.all())
    assert page.locator("svg#tree a.node.dim").count() == len(site["ws"].nodes()) - 5
    page.goto(site["url"] + "/?language=en&domain=legal")
    assert page.locator("#nodes tbody tr").all_inner_texts()[0].startswith("en/legal")


@browser_test
def test_the_playground_streams_a_completion_and_the_live_page_shows_the_engine(site, page, shots):
    page.goto(site["url"] + "/playground")
    _run_prompt(page, "en/software")
    page.wait_for_function("document.getElementById('output').textContent.length > 0"
                           " || !document.getElementById('error').hidden")
    assert page.is_hidden("#error"), page.inner_text("#error")
    page.wait_for_function("document.getElementById('answered').textContent.includes('tokens/s')")
    version = site["ws"].node("en/software").current_version
    assert page.get_attribute("#answered", "data-version") == version[:12]
    assert f"en/software@{version[:12]}" in page.inner_text("#answered")
    assert int(page.get_attribute("#output", "data-chunks")) > 1  # it arrived in pieces, as it was generated
    page.screenshot(path=shots / "dashboard-playground.png", full_page=True)

    page.goto(site["url"] + "/live")
    base = site["ws"].plan(version).base.node
    page.wait_for_function("document.querySelector('#models tbody').textContent.includes('en/software')")
    assert base in page.inner_text("#engines tbody")
    page.screenshot(path=shots / "dashboard-live.png", full_page=True)


@browser_test
def test_a_flag_shows_on_the_tree_the_node_and_the_playground(site, page, shots):
    ws = site["ws"]
    reason = "licence under review <script>document.title = 'injected'</script>"  # shown as text, never run
    info = risk.flag(ws, "dataset:en-python", reason=reason, severity="high", by="reviewer")
    try:
        page.goto(site["url"] + "/")
        state = lambda node: page.get_attribute(f'svg#tree a[data-node="{node}"]', "data-state")  # noqa: E731
        assert state("en/software/python") == "flagged"  # trained on the dataset
        for variant in ("int8", "int4", "lowrank", "sparse", "slim"):  # made from it (and its data, for some)
            assert state(f"en/software/python/{variant}") in ("flagged", "affected")
        assert state("en/software") == state("master") == "ok"
        page.screenshot(path=shots / "dashboard-flagged.png", full_page=True)
        page.click('svg#tree a[data-node="en/software/python"]')
        assert reason in page.inner_text("#flags") and page.title() != "injected"
        assert page.inner_text("#risk") == "flagged"

        page.goto(site["url"] + "/playground")
        _run_prompt(page, "en/software/python")
        page.wait_for_selector("#error:not([hidden])")
        assert f"flag #{info.id}" in page.inner_text("#error")
    finally:
        risk.unflag(ws, f"#{info.id}", reason="reviewed", by="reviewer")
    page.goto(site["url"] + "/")
    assert page.get_attribute('svg#tree a[data-node="en/software/python"]', "data-state") == "ok"


@browser_test
def test_pages_fit_a_phone(site, page, shots):
    for name, path in (("tree", "/"), ("node", "/node/en/software/python"), ("playground", "/playground"),
                       ("live", "/live")):
        page.goto(site["url"] + path)
        # the page never scrolls sideways: wide drawings and tables scroll inside their own frames
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
    page.goto(site["url"] + "/")
    page.screenshot(path=shots / "dashboard-phone.png", full_page=True)


@pytest.fixture(scope="module")
def ui_process(site):
    """A real `stemma ui` process on the same registry (no models loaded)."""
    from stemma.serve.server import free_port

    port = free_port()
    env = {**os.environ, "STEMMA_HOME": str(site["home"])}
    env.pop("STEMMA_REGISTRY_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "stemma.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/static/stemma.css", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"stemma ui did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=15)


@browser_test
def test_stemma_ui_is_read_only_and_says_serving_is_not_running(ui_process, page, shots):
    page.goto(ui_process + "/")
    assert page.locator("svg#tree a.node").count() > 0
    page.goto(ui_process + "/playground")
    assert "Serving is not running" in page.inner_text("#not-serving")
    assert page.locator("#playground").count() == 0
    page.screenshot(path=shots / "dashboard-ui-playground.png", full_page=True)
    response = page.goto(ui_process + "/node/en/nope")
    assert response.status == 404 and "no node 'en/nope'" in page.inner_text("#error")
    assert page.goto(ui_process + "/v1/models").status == 404  # no API without serving
