"""Each node's help page (web/docs/<NodeId>.md) in the host frontend's node documentation panel.

The panel is opened the way a user opens it: place the node on the canvas, click its title to select it,
then click the "info" button of the selection toolbox (InfoButton.vue, `data-testid="info-button"`). Where
the page then shows depends on the frontend (comfyui_frontend_package) the host ships; the test reads the
running frontend's version (window.__COMFYUI_FRONTEND_VERSION__) and expects the panel of that version:

* 1.30.x (ComfyUI 0.3.75): useSelectionState().showNodeHelp() opens the node-library sidebar tab and calls
  useNodeHelpStore().openHelp(nodeDef); NodeLibrarySidebarTab.vue shows NodeHelpPage.vue in the sidebar
  (`.sidebar-content-container`), the node's display name in its header beside the back button;
* 1.48.x (ComfyUI 0.33.0): useSelectionState().openNodeInfo() opens the right side panel
  (`data-testid="properties-panel"`) on its "Info" tab (`data-testid="panel-tab-info"`, selected), the
  node's title in the panel's <h3> header; the tab holds NodeHelpContent.vue.

Either way the help content is `.node-help-content`, holding `.markdown-content` (the fetched page,
rendered) or `.fallback-content` (the node's plain description and an input table, when the fetch failed),
and the same is asserted of it.

For every AttnEdit_ node, in one headless chromium page (Debian's chromium driven by Playwright) shared
by the module, the panel:

* names the node (its header) and renders markdown, not the fallback: `.markdown-content` is there,
  `.fallback-content` is not;
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

import pathlib
import re
import time
from typing import NamedTuple

import pytest
from headless_chromium import ARTIFACTS, close_dialogs, frontend_version, launch, open_frontend, require_playwright

from attention_edit.nodes import NODES

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
PACK_FOLDER = "attention-edit"  # the pack's folder in the host's custom_nodes/ (scripts/comfy_host.py)
LOCALE = "en"  # the frontend's default locale (fresh profile)
VIEWPORT = {"width": 1600, "height": 1000}
SCHEMAS = [cls.define_schema() for cls in NODES]
NODE_IDS = [s.node_id for s in SCHEMAS if s.node_id.startswith("AttnEdit_")]
DISPLAY_NAMES = {s.node_id: s.display_name or s.node_id for s in SCHEMAS}  # the panel's header


class HelpPanel(NamedTuple):
    """Where a frontend shows a node's help page after the info button: the help content and the header."""

    name: str
    content: str  # CSS: the .node-help-content that holds the page
    header: str  # CSS: the element naming the node, looked up from the content's container
    container: str  # CSS: the container (closest ancestor of the content) that holds the header too
    tab: str | None  # CSS: the tab that must be selected for the content to be this one, if the panel has tabs


SIDEBAR_HELP = HelpPanel("the node library sidebar's help page (NodeHelpPage.vue)",
                         ".sidebar-content-container .node-help-content", "span.font-semibold",
                         ".sidebar-content-container", None)
RIGHT_SIDE_PANEL_INFO = HelpPanel("the right side panel's Info tab (NodeHelpContent.vue)",
                                  '[data-testid="properties-panel"] .node-help-content', "section h3",
                                  '[data-testid="properties-panel"]', '[data-testid="panel-tab-info"]')
# The frontend whose info button opens the right side panel instead of the node library's help page: the one
# that added the panel (its Comfy.RightSidePanel.IsOpen setting is `versionAdded: 1.37.0` in 1.48.7).
RIGHT_SIDE_PANEL_SINCE = (1, 37, 0)


def help_panel(version: tuple[int, ...]) -> HelpPanel:
    return RIGHT_SIDE_PANEL_INFO if version >= RIGHT_SIDE_PANEL_SINCE else SIDEBAR_HELP


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

# What the help panel `p` (a HelpPanel) shows; where else a .node-help-content is, if not there.
PANEL_STATE = """(p) => {
  const panel = document.querySelector(p.content);
  if (!panel) {
    const elsewhere = Array.from(document.querySelectorAll('.node-help-content'))
      .map(e => (e.closest('[data-testid]') || e.parentElement).outerHTML.slice(0, 120));
    return {missing: true, elsewhere};
  }
  const md = panel.querySelector('.markdown-content');
  const text = el => el.textContent.trim();
  const container = panel.closest(p.container);
  const header = container && container.querySelector(p.header);
  const tab = p.tab ? document.querySelector(p.tab) : null;
  return {
    missing: false,
    visible: panel.getClientRects().length > 0,
    markdown: !!md,
    fallback: !!panel.querySelector('.fallback-content'),
    h1: md ? Array.from(md.querySelectorAll('h1')).map(text) : [],
    h2: md ? Array.from(md.querySelectorAll('h2')).map(text) : [],
    li_codes: md ? Array.from(md.querySelectorAll('li code')).map(text) : [],
    header: header ? text(header) : '',
    tab_selected: p.tab ? !!tab && tab.getAttribute('aria-selected') === 'true' : true,
  };
}"""


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
    version: tuple[int, ...]
    panel: HelpPanel

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
            open_frontend(fe.page, comfy_server.url)
            fe.version = frontend_version(fe.page)
            fe.panel = help_panel(fe.version)
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

    # The selection toolbox's info button opens this node's help: in the node library sidebar (1.30.x) or
    # on the right side panel's Info tab (1.48.x), see the module docstring.
    panel = frontend.panel
    info = page.locator('[data-testid="info-button"]')
    info.wait_for(state="visible", timeout=5000)
    info.click()
    where = f"{panel.name}, frontend {'.'.join(map(str, frontend.version))}"
    try:
        page.locator(panel.content).wait_for(state="visible", timeout=10_000)
    except Exception:
        pytest.fail(f"{node_id}: the info button did not open {where}: {page.evaluate(PANEL_STATE, panel._asdict())}")
    # Loaded means: the header names this node, and this node's page is there (its heading, not the previous
    # node's), or the fallback is. A timeout falls through to the assertions below, which say what is shown.
    content = page.locator(panel.content)
    heading = page_heading(source.read_text(encoding="utf-8")) if source.is_file() else None
    loaded = {"header": DISPLAY_NAMES[node_id], "heading": heading}
    try:
        page.wait_for_function(
            f"([p, want]) => {{ const s = ({PANEL_STATE})(p); return !!s && !s.missing && s.header === want.header"
            " && (s.fallback || (want.heading === null ? s.h1.length > 0 : s.h1[0] === want.heading)); }",
            arg=[panel._asdict(), loaded], timeout=10_000)
        content.locator(".markdown-content h1:first-child").or_(content.locator(".fallback-content")).first.wait_for(
            state="visible", timeout=10_000)
    except Exception as e:
        print(f"{node_id}: {where} did not settle on this node's page: {type(e).__name__}")
    TIMINGS[node_id] = time.monotonic() - t0
    page.wait_for_timeout(150)  # let the panel finish its layout before the screenshot
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"docs_{node_id}.png"))

    state = page.evaluate(PANEL_STATE, panel._asdict())
    requests = frontend.responses[responses_before:]
    assert source.is_file(), \
        f"{node_id} has no help page {source.relative_to(REPO)}; the panel shows " \
        f"{'the fallback (plain description)' if state['fallback'] else state}; docs requests: {requests}"
    first_input = first_input_id(source.read_text(encoding="utf-8"))

    assert state["visible"], f"{node_id}: {where} is not shown"
    assert state["tab_selected"], f"{node_id}: {where}: the panel's tab {panel.tab} is not the selected one"
    assert state["header"] == DISPLAY_NAMES[node_id], \
        f"{node_id}: {where} is headed {state['header']!r}, not the node's name {DISPLAY_NAMES[node_id]!r}"
    assert not state["fallback"], \
        f"{node_id}: the panel fell back to the node's plain description (the page did not load); docs requests: {requests}"
    assert state["markdown"], f"{node_id}: the panel has no rendered markdown"
    assert state["h1"][:1] == [heading], f"{node_id}: panel <h1>s {state['h1']}, the page's heading is {heading!r}"
    expect(content.locator(".markdown-content h1").first).to_be_in_viewport()
    assert "Inputs" in state["h2"], f"{node_id}: no 'Inputs' <h2> in the panel (h2s: {state['h2']})"
    assert first_input in state["li_codes"], \
        f"{node_id}: the first input {first_input!r} is not a list item's code span in the panel ({state['li_codes'][:8]})"
    first_item = content.locator(".markdown-content li code", has_text=re.compile(rf"^{re.escape(first_input)}$")).first
    first_item.scroll_into_view_if_needed()
    expect(first_item).to_be_visible()
    expect(first_item).to_be_in_viewport()

    assert (url_path, 200) in requests, f"{node_id}: no 200 for {url_path}; docs requests: {requests}"
    assert not frontend.page_errors[errors_before:], \
        "JavaScript errors on the page:\n" + "\n".join(frontend.page_errors[errors_before:])
