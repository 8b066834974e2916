"""The host's own frontend (comfyui-frontend-package) in Debian's headless chromium, driven by Playwright.

The page loads without a JavaScript error, registers every AttnEdit_ node type, can place each one on
the canvas with the sockets and widgets /object_info declares, and turns them into an API prompt with
the declared widget defaults. A screenshot of the canvas with the pack's nodes goes to
tests/artifacts/browser/frontend.png (git-ignored).

Never skipped: without chromium this test fails and says to run `make browser`.
"""

from __future__ import annotations

from headless_chromium import ARTIFACTS, launch, open_frontend, require_playwright

from attention_edit.nodes import NODES

NODE_IDS = [cls.define_schema().node_id for cls in NODES]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PACK_MARKERS = ("attention-edit", "attention_edit", "AttnEdit")

PLACE_NODES = """async (ids) => {
  const app = window.app;
  app.graph.clear();
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  const nodes = {};
  ids.forEach((id, i) => {
    const n = LiteGraph.createNode(id);
    if (!n) { nodes[id] = null; return; }
    n.pos = [120 + (i % 3) * 480, 200 + Math.floor(i / 3) * 380];
    app.graph.add(n);
    nodes[id] = {
      graph_id: String(n.id),
      inputs: (n.inputs || []).map(x => x.name),
      widgets: (n.widgets || []).map(w => w.name),
      outputs: (n.outputs || []).map(o => o.type),
    };
  });
  app.canvas.setDirty(true, true);
  const prompt = (await app.graphToPrompt()).output;
  return {nodes, prompt};
}"""


def _widget_type(spec) -> str | None:
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    return kind if kind in WIDGET_TYPES else None


def test_frontend_loads_and_knows_every_node(comfy_server, object_info):
    sync_playwright = require_playwright()

    page_errors: list[str] = []
    console_errors: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})  # a fresh profile
            page = context.new_page()
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("console", lambda m: console_errors.append(f"{m.text} @ {m.location.get('url', '')}")
                    if m.type == "error" else None)
            open_frontend(page, comfy_server.url)  # closes the first-run Templates dialog, which covers the canvas
            registered = page.evaluate("Object.keys(window.LiteGraph.registered_node_types)")
            placed = page.evaluate(PLACE_NODES, NODE_IDS)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "frontend.png"))
        finally:
            browser.close()

    assert not page_errors, "JavaScript errors on the page:\n" + "\n".join(page_errors)
    ours = [e for e in console_errors if any(m in e for m in PACK_MARKERS)]
    assert not ours, "console errors about the pack:\n" + "\n".join(ours) + \
        "\n\nall console errors:\n" + "\n".join(console_errors)

    missing = sorted(set(NODE_IDS) - set(registered))
    assert not missing, f"not in LiteGraph.registered_node_types: {missing}"

    prompt = placed["prompt"]
    for node_id in NODE_IDS:
        node = placed["nodes"][node_id]
        assert node is not None, f"LiteGraph.createNode({node_id!r}) returned nothing"
        info = object_info[node_id]
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        widgets = {name: spec for name, spec in declared.items() if _widget_type(spec)}
        assert set(node["inputs"]) | set(node["widgets"]) >= set(declared), \
            f"{node_id}: the frontend node lacks inputs {sorted(set(declared) - set(node['inputs']) - set(node['widgets']))}"
        assert set(widgets) <= set(node["widgets"]), f"{node_id}: widgets {node['widgets']}, declared {sorted(widgets)}"
        assert node["outputs"] == info["output"], f"{node_id}: frontend outputs {node['outputs']} vs {info['output']}"
        api = prompt[node["graph_id"]]
        assert api["class_type"] == node_id
        assert set(api["inputs"]) == set(widgets), f"{node_id}: graphToPrompt inputs {sorted(api['inputs'])}"
        for name, spec in widgets.items():
            if "default" in spec[1]:
                assert api["inputs"][name] == spec[1]["default"], \
                    f"{node_id}.{name}: the frontend wrote {api['inputs'][name]!r}, the default is {spec[1]['default']!r}"
