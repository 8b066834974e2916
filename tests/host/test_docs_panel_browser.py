"""Each node's help page (web/docs/<NodeId>.md) in the host frontend's node documentation panel.

The panel is opened the way a user opens it in the 1.32.9 frontend (comfyui_frontend_package): place the
node on the canvas, click its title to select it, then click the "info" button of the selection toolbox
(components/graph/selectionToolbox/InfoButton.vue, `data-testid="info-button"`). That button calls
useSelectionState().showNodeHelp(), which opens the node-library sidebar tab and calls
useNodeHelpStore().openHelp(nodeDef); NodeLibrarySidebarTab.vue then shows NodeHelpPage.vue, whose
`.node-help-content` holds either `.markdown-content` (the fetched page, rendered) or `.fallback-content`
(the node's plain description and an input table, when the fetch failed).

For every AttnEdit_ node, in one headless chromium page (Debian's chromium driven by Playwright) shared
by the module, the panel:

* renders markdown, not the fallback: `.markdown-content` is there, `.fallback-content` is not;
* shows the page's level-1 heading (the first line of the page, "# " stripped) as an <h1>, an
  "Inputs" <h2>, and the first input id of the page's "## Inputs" section as a list item's code span;
* was filled from our file: the request for /extensions/attention-edit/docs/<NodeId>.md (or, where the
  pack ships one, .../<NodeId>/en.md, which the frontend tries first) answered 200;
* and no JavaScript error was raised on the page.

The panel is opened for a node without a page too, so its failure says what the user sees instead (the
fallback) and which docs requests failed.

A screenshot per node goes to tests/artifacts/browser/docs_<NodeId>.png (git-ignored); per-node timings
are printed (pytest -rP).

Never skipped: without chromium or playwright these tests fail and say to run `make browser`.
"""

from __future__ import annotations

import json
import pathlib
import re
import time

import pytest
from headless_chromium import ARTIFACTS, close_dialogs, launch, require_playwright

from attention_edit.nodes import NODES

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
PACK_FOLDER = "attention-edit"  # the pack's folder in the host's custom_nodes/ (scripts/comfy_host.py)
LOCALE = "en"  # the frontend's default locale (fresh profile)
VIEWPORT = {"width": 1600, "height": 1000}
SCHEMAS = [cls.define_schema() for cls in NODES]
NODE_IDS = [s.node_id for s in SCHEMAS if s.node_id.startswith("AttnEdit_")]
DISPLAY_NAMES = {s.node_id: s.display_name or s.node_id for s in SCHEMAS}  # the panel's header
PANEL = ".node-help-content"
TIMINGS: dict[str, float] = {}

# A fresh graph with only this node, at a fixed place right of the sidebar, and where its title bar is on
# the page (client coordinates, from the canvas element's box and the canvas transform).
PLACE_NODE = """(id) => {
  const app = window.app;
  app.canvas.deselectAll && app.canvas.deselectAll();
  app.graph.clear();
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  const node = LiteGraph.createNode(id);
  if (!node) return null;
  node.pos = [760, 360];
  app.graph.add(node);
  app.canvas.setDirty(true, true);
  const rect = app.canvas.canvas.getBoundingClientRect();
  const ds = app.canvas.ds;
  const toClient = (x, y) => [rect.left + (x + ds.offset[0]) * ds.scale, rect.top + (y + ds.offset[1]) * ds.scale];
  const [x, y] = toClient(node.pos[0] + Math.min(60, node.size[0] / 3), node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2);
  return {graph_id: node.id, title: node.title, x, y};
}"""

SELECTED_IDS = "() => Array.from(window.app.canvas.selectedItems || []).map(i => i.id)"

PANEL_STATE = f"""() => {{
  const panel = document.querySelector('{PANEL}');
  if (!panel) return null;
  const md = panel.querySelector('.markdown-content');
  const text = el => el.textContent.trim();
  return {{
    markdown: !!md,
    fallback: !!panel.querySelector('.fallback-content'),
    h1: md ? Array.from(md.querySelectorAll('h1')).map(text) : [],
    h2: md ? Array.from(md.querySelectorAll('h2')).map(text) : [],
    li_codes: md ? Array.from(md.querySelectorAll('li code')).map(text) : [],
    header: (panel.parentElement.querySelector('span.font-semibold') || {{textContent: ''}}).textContent.trim(),
  }};
}}"""


def served_page(node_id: str) -> tuple[pathlib.Path, str]:
    """The file the panel shows for LOCALE and the URL path it comes from (locale variant first, as the frontend)."""
    variant = DOCS / node_id / f"{LOCALE}.md"
    if variant.is_file():
        return variant, f"/extensions/{PACK_FOLDER}/docs/{node_id}/{LOCALE}.md"
    return DOCS / f"{node_id}.md", f"/extensions/{PACK_FOLDER}/docs/{node_id}.md"


def page_heading(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    assert first.startswith("# "), f"the page does not start with a level-1 heading: {first!r}"
    return first[2:].strip()


def first_input_id(text: str) -> str:
    match = re.search(r"^## Inputs[^\n]*\n(.*?)(?=^#{1,2} |\Z)", text, re.M | re.S)
    assert match, "the page has no '## Inputs' section"
    item = re.search(r"^- `([^`]+)`", match.group(1), re.M)
    assert item, "the '## Inputs' section has no '- `<input id>` ...' item"
    return item.group(1)


class Frontend:
    def __init__(self, page):
        self.page = page
        self.page_errors: list[str] = []
        self.responses: list[tuple[str, int]] = []  # (URL path, status) of the pack's docs requests
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("response", self._on_response)

    def _on_response(self, response) -> None:
        from urllib.parse import urlparse

        path = urlparse(response.url).path
        if f"/extensions/{PACK_FOLDER}/docs/" in path:
            self.responses.append((path, response.status))


@pytest.fixture(scope="module")
def frontend(comfy_server):
    sync_playwright = require_playwright()
    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(viewport=VIEWPORT)  # a fresh profile
            fe = Frontend(context.new_page())
            fe.page.goto(comfy_server.url, wait_until="domcontentloaded")
            fe.page.wait_for_function("window.app && window.app.graph", timeout=60_000)
            try:  # the first-run Templates dialog shows up a moment after the app
                fe.page.wait_for_selector(".p-dialog", state="visible", timeout=8000)
            except Exception:
                pass
            close_dialogs(fe.page)
            yield fe
        finally:
            browser.close()


@pytest.fixture(scope="module", autouse=True)
def timings_report():
    yield
    if TIMINGS:
        print("\ndocs panel, seconds per node (place, select, info button, rendered): "
              + ", ".join(f"{k} {v:.2f}" for k, v in TIMINGS.items()) + f"; total {sum(TIMINGS.values()):.2f}")


def test_every_node_has_a_panel_test():
    assert NODE_IDS, "attention_edit.nodes.NODES has no AttnEdit_ node"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_docs_panel_shows_the_page(frontend, node_id):
    from playwright.sync_api import expect

    source, url_path = served_page(node_id)
    page = frontend.page
    errors_before, responses_before = len(frontend.page_errors), len(frontend.responses)
    t0 = time.monotonic()
    close_dialogs(page)
    placed = page.evaluate(PLACE_NODE, node_id)
    assert placed is not None, f"LiteGraph.createNode({node_id!r}) returned nothing"
    page.wait_for_timeout(100)  # one frame: the canvas draws the node before it is clicked

    # Select the node as a user does: a click on its title bar.
    page.mouse.click(placed["x"], placed["y"])
    page.wait_for_function(f"({SELECTED_IDS})().map(String).includes({str(placed['graph_id'])!r})", timeout=5000)

    # The selection toolbox's info button opens the node library sidebar with this node's help page.
    info = page.locator('[data-testid="info-button"]')
    info.wait_for(state="visible", timeout=5000)
    info.click()
    page.locator(PANEL).wait_for(state="visible", timeout=10_000)
    # Loaded means: our page's heading is there, or the fallback is (the header names the node either way).
    title = page.locator(f"{PANEL} .markdown-content h1:first-child").or_(page.locator(f"{PANEL} .fallback-content"))
    page.wait_for_function(
        f"(() => {{ const s = ({PANEL_STATE})(); return s && s.header === {json.dumps(DISPLAY_NAMES[node_id])} "
        "&& (s.fallback || s.h1.length > 0); })()", timeout=10_000)
    title.first.wait_for(state="visible", timeout=10_000)
    TIMINGS[node_id] = time.monotonic() - t0
    page.wait_for_timeout(150)  # let the panel finish its layout before the screenshot
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"docs_{node_id}.png"))

    state = page.evaluate(PANEL_STATE)
    requests = frontend.responses[responses_before:]
    assert source.is_file(), \
        f"{node_id} has no help page {source.relative_to(REPO)}; the panel shows " \
        f"{'the fallback (plain description)' if state['fallback'] else state}; docs requests: {requests}"
    text = source.read_text(encoding="utf-8")
    heading, first_input = page_heading(text), first_input_id(text)

    assert not state["fallback"], \
        f"{node_id}: the panel fell back to the node's plain description (the page did not load); docs requests: {requests}"
    assert state["markdown"], f"{node_id}: the panel has no rendered markdown"
    assert state["h1"][:1] == [heading], f"{node_id}: panel <h1>s {state['h1']}, the page's heading is {heading!r}"
    expect(page.locator(f"{PANEL} .markdown-content h1").first).to_be_in_viewport()
    assert "Inputs" in state["h2"], f"{node_id}: no 'Inputs' <h2> in the panel (h2s: {state['h2']})"
    assert first_input in state["li_codes"], \
        f"{node_id}: the first input {first_input!r} is not a list item's code span in the panel ({state['li_codes'][:8]})"
    first_item = page.locator(f"{PANEL} .markdown-content li code", has_text=re.compile(rf"^{re.escape(first_input)}$")).first
    first_item.scroll_into_view_if_needed()
    expect(first_item).to_be_visible()
    expect(first_item).to_be_in_viewport()

    assert (url_path, 200) in requests, f"{node_id}: no 200 for {url_path}; docs requests: {requests}"
    assert not frontend.page_errors[errors_before:], \
        "JavaScript errors on the page:\n" + "\n".join(frontend.page_errors[errors_before:])
