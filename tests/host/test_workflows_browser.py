"""Every example workflow (workflows/*.json) through the host's own frontend, then run on the toy-world model.

For each workflow, in one headless chromium page (Debian's chromium driven by Playwright, shared by the
module):

* test_workflow_loads_in_frontend: `app.loadGraphData(workflow)` (the frontend's own loading path, its
  workflow validation included) knows every node type, marks no node as an error (1.48.x flags a loader
  whose model file the host does not list: the test's base directory has, as a user's would, files under
  the checkpoint names the workflows select, see tests/host/conftest.py), opens no dialog (missing nodes,
  load error), raises no toast (the link validator's "Workflow Validation" warnings, schema alerts), logs
  no page or console error, and keeps the file as written: after loading, the graph the frontend
  serializes has the file's links and, node by node, its types, widget values, connected inputs and
  output links (node and link ids compared in one form: 1.48.x's live graph has string node ids, the file
  numbers; the API prompt's are strings on both sides and compared as they are). Every link's type
  is the type of the output it leaves and is accepted by the input it enters. `app.graphToPrompt()` turns
  it into the same API prompt as scripts/workflow_tools.ui_to_api (what `make demo` queues), and an
  AttnEdit_EditSampler fed by an inversion uses that inversion's steps and scheduler. A screenshot of the
  loaded canvas goes to tests/artifacts/browser/<workflow>.png (git-ignored; workflows/<workflow>.png
  thumbnails are a separate step and never written here).
* test_workflow_runs_from_frontend_prompt: the frontend's API prompt, pointed at the test's model files
  (every CheckpointLoaderSimple becomes AttnEdit_ToyModelLoader, which has the same outputs, loading the toy
  model of the checkpoint's family: the toy flow world for Flux, the SD3.5-shaped toy for SD3, else the UNet
  toy world; their text encoder is the toy CLIP, and FluxGuidance is harmless on them), with fewer
  steps (see SMOKE_STEPS) and the instant masks' start_map at `direct` (the toy model's start token attends
  to the object, see web/docs/AttnEdit_InstantMaskEstimate.md), is queued on the session's host and
  succeeds; every SaveImage writes a non-empty 128x128 PNG. The LoadImage inputs are a toy-world scene
  written under the names the workflows reference.

* test_workflow_layout_in_frontend: the layout as the frontend holds it after loading (what it would save):
  every node sits inside exactly one titled group (the note node above them), no two groups overlap, and
  every wire (the frontend's spline between its two slots, sampled) passes over no group but the ones of
  the nodes it connects. A screenshot of the whole laid-out graph goes to the artifacts folder, and with
  ATTN_EDIT_UPDATE_DOCS=1 to docs/workflows/<workflow>.png (the screenshots the README shows).
* In test_workflow_runs_from_frontend_prompt the prompt is queued for the page's own client, and each
  Edit Sampler then shows its edit report in the page (the pack's web/js/edit_report.js widget, filled
  from the node's UI output). With ATTN_EDIT_UPDATE_DOCS=1 the run's images become the workflow's
  thumbnail, workflows/<workflow>.jpg: the input (or source) and the results side by side, labelled, made
  with the toy-world model.

Per-workflow timings go to tests/artifacts/browser/workflow_timings.json and are printed (pytest -rP).
Never skipped: without chromium or playwright these tests fail and say to run `make browser`.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import sys
import time

import pytest
import workflow_tools
from headless_chromium import ARTIFACTS, VISIBLE_DIALOGS, close_dialogs, launch, open_frontend, require_playwright

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the repository root, for `toyworld`

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
# Wide enough that the fitted view of a workflow stays above the zoom where LiteGraph drops node details.
VIEWPORT = {"width": 2560, "height": 1440}
TOY_SIZE = 128  # the toy model's image side (16x16 latents); the input image and EmptyLatentImage use it
# CI time: the shipped workflows use 50 DDIM steps; the smoke run uses 10 on every sampling node. All get the
# same value, because AttnEdit_EditSampler requires its inversion's steps (AttnEdit_DDIMInversion).
SMOKE_STEPS = 10
STEP_NODES = ("AttnEdit_DDIMInversion", "AttnEdit_EditSampler", "KSampler")
INSTANT_MASK_NODES = ("AttnEdit_InstantMask", "AttnEdit_InstantMaskEstimate")
RUN_TIMEOUT = 300.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMINGS: dict[str, dict[str, float]] = {}
UPDATE_DOCS = os.environ.get("ATTN_EDIT_UPDATE_DOCS") == "1"
DOCS_DIR = REPO / "docs" / "workflows"
REPORT_TIMEOUT_MS = 30_000

# The layout as the frontend holds it: groups, nodes (with their title bars) and every wire's two ends.
LAYOUT = """() => {
  const g = app.graph, title = LiteGraph.NODE_TITLE_HEIGHT;
  const groups = (g._groups || g.groups || []).map(gr => ({title: gr.title,
    bounding: Array.from(gr._bounding || gr.bounding)}));
  const nodes = g._nodes.map(n => ({id: String(n.id), type: n.type, title: n.title,
    box: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]}));
  const wires = [];
  for (const l of g.links.values ? g.links.values() : Object.values(g.links)) {
    if (!l) continue;
    const o = g.getNodeById(l.origin_id), t = g.getNodeById(l.target_id);
    wires.push({id: String(l.id), origin: String(l.origin_id), target: String(l.target_id),
      a: Array.from(o.getConnectionPos(false, l.origin_slot)), b: Array.from(t.getConnectionPos(true, l.target_slot))});
  }
  return {groups, nodes, wires};
}"""

# Shows the whole graph (groups and nodes) in the viewport, as large as it fits beside the frontend's side bar
# and tab bar (margins in screen pixels), with the minimap (1.48.x) closed.
FIT_VIEW = """() => {
  try { app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
  const g = app.graph, c = app.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const add = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); };
  for (const n of g._nodes) add(n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title);
  for (const gr of (g._groups || g.groups || [])) { const b = gr._bounding || gr.bounding; add(b[0], b[1], b[2], b[3]); }
  const rect = c.canvas.getBoundingClientRect(), left = 110, top = 90, right = 30, bottom = 40;
  const scale = Math.min((rect.width - left - right) / (x1 - x0), (rect.height - top - bottom) / (y1 - y0));
  c.ds.scale = scale;
  c.ds.offset[0] = left / scale - x0 + ((rect.width - left - right) / scale - (x1 - x0)) / 2;
  c.ds.offset[1] = top / scale - y0;
  c.setDirty(true, true);
  return {scale, width: rect.width, height: rect.height};
}"""

# The edit report each Edit Sampler shows (its report widget), by node id.
REPORTS = """() => Object.fromEntries(app.graph._nodes.filter(n => n.type === 'AttnEdit_EditSampler').map(n => {
  const w = (n.widgets || []).find(w => w.name === 'edit_report');
  return [String(n.id), w ? String(w.value || '') : null];
}))"""

# Loads a workflow the way the frontend does (File > Open ends in app.loadGraphData), recording the toasts it
# raises on the way (the link validator reports through the toast store), then reads back what it built.
LOAD_WORKFLOW = """async (workflow) => {
  const app = window.app;
  const toastStore = app.extensionManager.toast;
  const toasts = [];
  const add = toastStore.add, addAlert = toastStore.addAlert;
  toastStore.add = (m) => {
    toasts.push(`${m.severity}: ${m.summary || ''}: ${m.detail || ''}`);
    return add.call(toastStore, m);
  };
  toastStore.addAlert = (m) => { toasts.push(`alert: ${m}`); return addAlert.call(toastStore, m); };
  const t0 = performance.now();
  let loadError = null;
  try {
    await app.loadGraphData(workflow);
  } catch (e) {
    loadError = String(e && e.stack || e);
  } finally {
    toastStore.add = add;
    toastStore.addAlert = addAlert;
  }
  const loadMs = performance.now() - t0;
  const registered = LiteGraph.registered_node_types;
  const nodes = app.graph._nodes.map(n => ({
    id: n.id, type: n.type, registered: n.type in registered, has_errors: !!n.has_errors,
    inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link})),
    outputs: (n.outputs || []).map(o => ({name: o.name, type: o.type, links: o.links || []})),
  }));
  const links = [];
  for (const l of app.graph.links.values ? app.graph.links.values() : Object.values(app.graph.links)) {
    if (!l) continue;
    const origin = app.graph.getNodeById(l.origin_id), target = app.graph.getNodeById(l.target_id);
    const out = origin && origin.outputs ? origin.outputs[l.origin_slot] : null;
    const inp = target && target.inputs ? target.inputs[l.target_slot] : null;
    links.push({id: l.id, type: l.type, origin: l.origin_id, origin_slot: l.origin_slot, target: l.target_id,
                target_slot: l.target_slot, origin_type: out ? out.type : null, target_type: inp ? inp.type : null,
                target_name: inp ? inp.name : null,
                accepted: out && inp ? LiteGraph.isValidConnection(out.type, inp.type) : false});
  }
  const serialized = app.graph.serialize();
  let prompt = null, promptError = null;
  const t1 = performance.now();
  try {
    prompt = (await app.graphToPrompt()).output;
  } catch (e) {
    promptError = String(e && e.stack || e);
  }
  const promptMs = performance.now() - t1;
  return {loadError, toasts, nodes, links, serialized, prompt, promptError, loadMs, promptMs};
}"""

def _load_image_names(workflow: dict) -> list[str]:
    return [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage" and n.get("widgets_values")]


def _write_toy_image(path: pathlib.Path) -> None:
    """A toy-world scene (the source prompt of the example workflows: a large red circle, white background)."""
    from PIL import Image

    from toyworld import scenes

    circle = scenes.ObjectSpec(shape="circle", colour="red", size="large", position="center", cx=64, cy=64, r=24)
    image, _ = scenes.render(scenes.Scene(background="white", objects=(circle,)), size=TOY_SIZE)
    assert image.shape == (TOY_SIZE, TOY_SIZE, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def input_images(comfy_server) -> dict[str, pathlib.Path]:
    """The images every workflow's LoadImage nodes name, in the host's input folder (before the page lists them)."""
    written = {}
    for wf_file in WORKFLOWS:
        for name in _load_image_names(json.loads(wf_file.read_text())):
            path = comfy_server.base / "input" / name
            if name not in written:
                _write_toy_image(path)
                written[name] = path
    return written


class Frontend:
    def __init__(self, page, origin: str):
        self.page = page
        self.origin = origin
        self.page_errors: list[str] = []
        self.console: list[tuple[str, str, str]] = []  # (type, text, url)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", lambda m: self.console.append((m.type, m.text, m.location.get("url", ""))))

    def load(self, workflow: dict) -> dict:
        """Load a workflow through the frontend; return what it built, the dialogs it opened and what it logged."""
        close_dialogs(self.page)
        first_console = len(self.console)
        result = self.page.evaluate(LOAD_WORKFLOW, workflow)
        self.page.wait_for_timeout(500)  # dialogs render, the view fits the graph (requestAnimationFrame)
        result["dialogs"] = self.page.evaluate(VISIBLE_DIALOGS)
        # The frontend also asks the comfy.org registry about the loaded node types; nothing outside the host
        # answers here, so failed requests to other origins are the sandbox, not the workflow.
        result["console_errors"] = [f"{text} @ {url}" for kind, text, url in self.console[first_console:]
                                    if kind == "error" and not (text.startswith("Failed to load resource")
                                                                and not url.startswith(self.origin))]
        return result


@pytest.fixture(scope="module")
def frontend(comfy_server, input_images):
    sync_playwright = require_playwright()
    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(viewport=VIEWPORT)  # a fresh profile
            fe = Frontend(context.new_page(), comfy_server.url)
            open_frontend(fe.page, comfy_server.url)
            yield fe
        finally:
            browser.close()


@pytest.fixture(scope="module", autouse=True)
def timings_report():
    yield
    if TIMINGS:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "workflow_timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")


def _workflow(wf_file: pathlib.Path | None) -> dict:
    if wf_file is None:
        pytest.fail(f"no workflows/*.json in {WORKFLOW_DIR}: run scripts/make_workflows.py")
    return json.loads(wf_file.read_text())


def _id(value) -> str:
    """A node or link id in one form for comparisons: the file has numbers, 1.48.x's live graph has node ids as
    strings ('1'), 1.30.x numbers; an API prompt writes them as strings."""
    return str(value)


def _assert_loaded(result: dict, workflow: dict, frontend: Frontend) -> None:
    """What every use of a loaded workflow needs: all node types known, nothing failed or warned."""
    assert result["loadError"] is None, f"app.loadGraphData threw: {result['loadError']}"
    missing = sorted({n["type"] for n in result["nodes"] if not n["registered"]})
    assert not missing, f"node types not in LiteGraph.registered_node_types: {missing}; dialogs: {result['dialogs']}"
    assert not [n for n in result["nodes"] if n["has_errors"]], \
        f"nodes with has_errors: {[(n['id'], n['type']) for n in result['nodes'] if n['has_errors']]}"
    file_types = {_id(n["id"]): n["type"] for n in workflow["nodes"]}
    loaded_types = {_id(n["id"]): n["type"] for n in result["nodes"]}
    assert loaded_types == file_types, f"loaded nodes {loaded_types} differ from the file's {file_types}"
    missing_dialogs = [d for d in result["dialogs"] if "missing" in d.lower()]
    assert not missing_dialogs, "the frontend opened a missing-nodes/models dialog:\n" + "\n---\n".join(missing_dialogs)
    assert not result["dialogs"], "the frontend opened a dialog while loading:\n" + "\n---\n".join(result["dialogs"])
    assert not result["toasts"], "the frontend warned while loading:\n" + "\n".join(result["toasts"])
    assert not frontend.page_errors, "JavaScript errors on the page:\n" + "\n".join(frontend.page_errors)
    assert result["promptError"] is None, f"app.graphToPrompt threw: {result['promptError']}"


def _link_ids(link: list) -> list:
    """A serialized link [id, origin node, origin slot, target node, target slot, type] with its ids in one form."""
    link_id, origin, origin_slot, target, target_slot, *rest = link
    return [_id(link_id), _id(origin), origin_slot, _id(target), target_slot, *rest]


def _round_trip_differences(workflow: dict, serialized: dict) -> list[str]:
    """Where the graph the frontend built (serialized again) differs from the file it loaded."""
    diffs = []
    file_links, loaded_links = ({lk[0]: lk for lk in map(_link_ids, links)}
                                for links in (workflow["links"], serialized["links"]))
    for link_id in sorted(set(file_links) | set(loaded_links), key=lambda i: (len(i), i)):
        if file_links.get(link_id) != loaded_links.get(link_id):
            diffs.append(f"link {link_id}: file {file_links.get(link_id)}, frontend {loaded_links.get(link_id)}")
    loaded = {_id(n["id"]): n for n in serialized["nodes"]}
    for node in workflow["nodes"]:
        name = f"node {node['id']} ({node['type']})"
        got = loaded.get(_id(node["id"]))
        if got is None:
            diffs.append(f"{name}: not in the loaded graph")
            continue
        if got.get("widgets_values", []) != node.get("widgets_values", []):
            diffs.append(f"{name}.widgets_values: file {node.get('widgets_values')}, frontend {got.get('widgets_values')}")
        file_inputs = {i["name"]: _id(i["link"]) for i in node.get("inputs", []) if i.get("link") is not None}
        got_inputs = {i["name"]: _id(i["link"]) for i in got.get("inputs", []) if i.get("link") is not None}
        if got_inputs != file_inputs:
            diffs.append(f"{name} connected inputs: file {file_inputs}, frontend {got_inputs}")
        file_outputs = [(o["type"], sorted(map(_id, o.get("links") or []))) for o in node.get("outputs", [])]
        got_outputs = [(o["type"], sorted(map(_id, o.get("links") or []))) for o in got.get("outputs", [])]
        if got_outputs != file_outputs:
            diffs.append(f"{name} outputs (type, links): file {file_outputs}, frontend {got_outputs}")
        if got.get("mode", 0) != node.get("mode", 0):
            diffs.append(f"{name}.mode: file {node.get('mode')}, frontend {got.get('mode')}")
    return diffs


def _link_type_problems(result: dict) -> list[str]:
    problems = []
    for lk in result["links"]:
        where = (f"link {lk['id']} ({lk['origin']}:{lk['origin_slot']} -> {lk['target']}:{lk['target_slot']} "
                 f"{lk['target_name']})")
        if lk["type"] != lk["origin_type"]:
            problems.append(f"{where}: link type {lk['type']!r}, the output's type {lk['origin_type']!r}")
        if not lk["accepted"]:
            problems.append(f"{where}: output type {lk['origin_type']!r} does not fit input type {lk['target_type']!r}")
    return problems


def _strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.fixture(scope="module")
def node_classes() -> dict:
    """Every node class the workflows may use (the host's core and comfy_extras nodes, and ours), in this process."""
    from attention_edit.nodes import NODES

    classes = dict(workflow_tools.host_node_classes())
    classes.update({cls.define_schema().node_id: cls for cls in NODES})
    return classes


def _inversion_mismatches(prompt: dict) -> list[str]:
    """An EditSampler fed by an inversion must use the inversion's steps and scheduler (the node's contract)."""
    problems = []
    for node_id, node in prompt.items():
        source = node["inputs"].get("inversion")
        if node["class_type"] != "AttnEdit_EditSampler" or not isinstance(source, list):
            continue
        inversion = prompt[source[0]]
        for key in ("steps", "scheduler"):
            if inversion["inputs"].get(key) != node["inputs"].get(key):
                problems.append(f"EditSampler {node_id}.{key} = {node['inputs'].get(key)!r}, its inversion "
                                f"{source[0]} ({inversion['class_type']}) has {inversion['inputs'].get(key)!r}")
    return problems


PARAMS = [pytest.param(f, id=f.stem) for f in WORKFLOWS] or [pytest.param(None, id="no-workflows")]


@pytest.mark.parametrize("wf_file", PARAMS)
def test_workflow_loads_in_frontend(wf_file, node_classes, frontend):
    workflow = _workflow(wf_file)
    t0 = time.monotonic()
    result = frontend.load(workflow)
    TIMINGS.setdefault(wf_file.stem, {}).update(load_ms=round(result["loadMs"], 1),
                                                 graph_to_prompt_ms=round(result["promptMs"], 1))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    frontend.page.screenshot(path=str(ARTIFACTS / f"{wf_file.stem}.png"))
    TIMINGS[wf_file.stem]["load_check_s"] = round(time.monotonic() - t0, 2)
    print(f"{wf_file.stem}: loadGraphData {result['loadMs']:.0f} ms, graphToPrompt {result['promptMs']:.0f} ms")

    _assert_loaded(result, workflow, frontend)
    assert not result["console_errors"], "console errors while loading:\n" + "\n".join(result["console_errors"])
    diffs = _round_trip_differences(workflow, result["serialized"])
    assert not diffs, "the frontend changed the workflow while loading it:\n" + "\n".join(diffs)
    problems = _link_type_problems(result)
    assert not problems, "links whose types do not match their sockets:\n" + "\n".join(problems)

    prompt = _strip_meta(result["prompt"])
    assert set(prompt) == {str(n["id"]) for n in workflow["nodes"]
                           if n.get("mode", 0) not in (2, 4) and n["type"] not in workflow_tools.VIRTUAL_TYPES}
    ours = workflow_tools.ui_to_api(workflow, node_classes)
    differing = {k: {"frontend": prompt.get(k), "ui_to_api": ours.get(k)}
                 for k in sorted(set(prompt) | set(ours)) if prompt.get(k) != ours.get(k)}
    assert not differing, "app.graphToPrompt and workflow_tools.ui_to_api disagree:\n" + json.dumps(differing, indent=1)
    mismatches = _inversion_mismatches(prompt)
    assert not mismatches, "\n".join(mismatches)


def _toy_model_for(checkpoint: str, model_files: dict) -> str:
    """The test's toy model of the checkpoint's family: the toy flow world for a Flux checkpoint, the
    SD3.5-shaped toy for an SD3 one, else the UNet toy world (all three at TOY_SIZE, on the toy CLIP and VAE)."""
    name = checkpoint.lower()
    if "flux" in name:
        return model_files["toy_flux_model"]
    if "sd3" in name:
        return model_files["toy_sd3_model"]
    return model_files["toy_model"]


def _smoke_prompt(prompt: dict, model_files: dict) -> dict:
    """The frontend's prompt on the test's model files (the toy model of each checkpoint's family) and at the
    toy model's size, with SMOKE_STEPS steps."""
    prompt = _strip_meta(json.loads(json.dumps(prompt)))
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":  # same outputs: MODEL, CLIP, VAE
            node["class_type"] = "AttnEdit_ToyModelLoader"
            node["inputs"] = {"model_name": _toy_model_for(node["inputs"]["ckpt_name"], model_files)}
        elif node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=TOY_SIZE, height=TOY_SIZE)
        if node["class_type"] in STEP_NODES and "steps" in node["inputs"]:
            node["inputs"]["steps"] = SMOKE_STEPS
        if node["class_type"] in INSTANT_MASK_NODES:  # the toy model's start token attends to the object
            node["inputs"]["start_map"] = "direct"  # (see the nodes' docs): the setting for this model
    return prompt


@pytest.mark.parametrize("wf_file", PARAMS)
def test_workflow_runs_from_frontend_prompt(wf_file, frontend, comfy_server, host_model_files, input_images,
                                            object_info):
    workflow = _workflow(wf_file)
    for name in _load_image_names(workflow):
        assert name in input_images and (comfy_server.base / "input" / name).is_file(), f"input image {name} missing"
    assert object_info["AttnEdit_ToyModelLoader"]["output"] == object_info["CheckpointLoaderSimple"]["output"]

    result = frontend.load(workflow)
    _assert_loaded(result, workflow, frontend)
    prompt = _smoke_prompt(result["prompt"], host_model_files)
    assert "CheckpointLoaderSimple" not in {n["class_type"] for n in prompt.values()}

    t0 = time.monotonic()
    client_id = frontend.page.evaluate("window.comfyAPI.api.api.clientId")
    prompt_id = comfy_server.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
    entry = comfy_server.wait(prompt_id, timeout=RUN_TIMEOUT)  # raises with the failing node's message
    run_s = time.monotonic() - t0
    TIMINGS.setdefault(wf_file.stem, {})["run_s"] = round(run_s, 2)
    print(f"{wf_file.stem}: ran in {run_s:.1f} s ({SMOKE_STEPS} steps, {TOY_SIZE}x{TOY_SIZE} toy model)")

    history = comfy_server.get(f"/history/{prompt_id}")[prompt_id]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"], history["status"]
    savers = {k for k, v in prompt.items() if v["class_type"] == "SaveImage"}
    assert savers, "the workflow has no SaveImage node"
    assert savers <= set(entry["outputs"]), f"SaveImage nodes without outputs: {sorted(savers - set(entry['outputs']))}"
    files = comfy_server.output_files(entry)
    assert len(files) >= len(savers), f"{len(files)} output files for {len(savers)} SaveImage nodes"
    samplers = [k for k, v in prompt.items() if v["class_type"] == "AttnEdit_EditSampler"]
    for node_id in samplers:  # the report: in the node's UI output, and shown on the node in the page
        text = "\n".join(entry["outputs"].get(node_id, {}).get("text", []))
        assert text.startswith("Edit report"), f"Edit Sampler {node_id} returned no edit report: {entry['outputs']}"
        frontend.page.wait_for_function(f"(() => ({REPORTS})()[{json.dumps(node_id)}])()",
                                        timeout=REPORT_TIMEOUT_MS)
        shown = frontend.page.evaluate(REPORTS)[node_id]
        assert shown == text, f"the page shows {shown!r} for Edit Sampler {node_id}, its UI output is {text!r}"
        print(f"{wf_file.stem}: Edit Sampler {node_id} report:\n{shown}")
    if samplers:
        frontend.page.screenshot(path=str(ARTIFACTS / f"{wf_file.stem}_ran.png"))
    from PIL import Image

    for f in files:
        assert f.is_file(), f"output file {f} does not exist"
        data = f.read_bytes()
        assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE), f"{f} is not a PNG"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (TOY_SIZE, TOY_SIZE), f"{f.name}: {im.size}, expected {TOY_SIZE}x{TOY_SIZE}"

    if UPDATE_DOCS:
        toys = sorted({n["inputs"]["model_name"] for n in prompt.values() if n["class_type"] == "AttnEdit_ToyModelLoader"})
        write_thumbnail(wf_file.stem, workflow, entry, comfy_server, input_images, toys)


def _groups_of(box, groups) -> list[int]:
    x, y, w, h = box
    return [i for i, g in enumerate(groups) if g["bounding"][0] <= x and g["bounding"][1] <= y
            and x + w <= g["bounding"][0] + g["bounding"][2] and y + h <= g["bounding"][1] + g["bounding"][3]]


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _spline(a, b, samples: int = 48) -> list[tuple[float, float]]:
    """Points of the frontend's spline link from output slot `a` to input slot `b` (LiteGraph's bezier: control
    points a quarter of the distance out along the horizontal)."""
    dist = ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5
    p0, p1, p2, p3 = a, (a[0] + dist * 0.25, a[1]), (b[0] - dist * 0.25, b[1]), b
    points = []
    for k in range(samples + 1):
        t = k / samples
        u = 1 - t
        points.append(tuple(u ** 3 * p0[i] + 3 * u * u * t * p1[i] + 3 * u * t * t * p2[i] + t ** 3 * p3[i]
                            for i in range(2)))
    return points


def layout_problems(layout: dict) -> list[str]:
    groups, problems = layout["groups"], []
    if len(groups) < 2:
        problems.append(f"{len(groups)} groups: a workflow is laid out in titled groups")
    for i, g in enumerate(groups):
        if not g["title"].strip():
            problems.append(f"group {i} has no title")
        for j in range(i + 1, len(groups)):
            if _overlap(g["bounding"], groups[j]["bounding"]):
                problems.append(f"groups '{g['title']}' and '{groups[j]['title']}' overlap")
    home = {}
    for node in layout["nodes"]:
        inside = _groups_of(node["box"], groups)
        if node["type"] in workflow_tools.VIRTUAL_TYPES:
            if any(_overlap(node["box"], g["bounding"]) for g in groups):
                problems.append(f"the note '{node['title']}' lies over a group")
            continue
        if len(inside) != 1:
            problems.append(f"node {node['id']} ({node['type']}) is inside {len(inside)} groups, not one")
        home[node["id"]] = set(inside)
    for wire in layout["wires"]:
        allowed = home.get(wire["origin"], set()) | home.get(wire["target"], set())
        for x, y in _spline(wire["a"], wire["b"]):
            crossed = [g["title"] for i, g in enumerate(groups) if i not in allowed
                       and g["bounding"][0] < x < g["bounding"][0] + g["bounding"][2]
                       and g["bounding"][1] < y < g["bounding"][1] + g["bounding"][3]]
            if crossed:
                problems.append(f"wire {wire['id']} ({wire['origin']} -> {wire['target']}) crosses group "
                                f"'{crossed[0]}', which it does not connect")
                break
    return problems


@pytest.mark.parametrize("wf_file", PARAMS)
def test_workflow_layout_in_frontend(wf_file, frontend):
    workflow = _workflow(wf_file)
    result = frontend.load(workflow)
    _assert_loaded(result, workflow, frontend)
    layout = frontend.page.evaluate(LAYOUT)
    titles = [g["title"] for g in layout["groups"]]
    assert titles == [g["title"] for g in workflow["groups"]], f"the frontend's groups {titles} are not the file's"
    problems = layout_problems(layout)
    frontend.page.evaluate(FIT_VIEW)
    frontend.page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{wf_file.stem}_layout.png"
    frontend.page.screenshot(path=str(shot))
    if UPDATE_DOCS:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        frontend.page.screenshot(path=str(DOCS_DIR / f"{wf_file.stem}.png"))
    assert not problems, "layout problems:\n" + "\n".join(problems)
    notes = [n for n in workflow["nodes"] if n["type"] in workflow_tools.VIRTUAL_TYPES]
    assert len(notes) == 1 and notes[0]["widgets_values"][0].startswith("Change first"), \
        "each workflow has one note saying what to change first"


THUMB_SIDE = 256
LABEL_H = 28


def write_thumbnail(name: str, workflow: dict, entry: dict, server, input_images: dict,
                    toy_models: list[str] = ()) -> None:
    """workflows/<name>.jpg: the input image (when the workflow loads one) and every saved or previewed image,
    side by side in the workflow's order, each labelled with its node's title, under a caption saying the
    pictures come from the toy-world model (and, when it ran a seeded random stand-in, that they show a smoke
    run, not an edit)."""
    from PIL import Image, ImageDraw

    titles = {str(n["id"]): n.get("title") or n["type"] for n in workflow["nodes"]}
    order = [str(n["id"]) for n in sorted(workflow["nodes"], key=lambda n: (n["pos"][0], n["pos"][1]))]
    panels = [("Input", input_images[name_]) for name_ in _load_image_names(workflow)][:1]
    for node_id in order:
        for img in entry["outputs"].get(node_id, {}).get("images", []):
            panels.append((titles[node_id], server.base / img.get("type", "output") / img.get("subfolder", "")
                           / img["filename"]))
    caption = f"{name}: toy-world model (no real weights), {SMOKE_STEPS} steps"
    from attention_edit.toyworld.model import FLOW_RANDOM_FILE_NAME, SD3_RANDOM_FILE_NAME

    random = [m for m in toy_models if m in (FLOW_RANDOM_FILE_NAME, SD3_RANDOM_FILE_NAME)]
    if random:  # demo_dit_file's untrained stand-ins (toyworld/model.py): their images are noise by design
        caption = (f"{name}: random-weight toy model {', '.join(random)} (a smoke run, not an edit), "
                   f"{SMOKE_STEPS} steps")
    width = max(len(panels), 2) * THUMB_SIDE
    sheet = Image.new("RGB", (width, THUMB_SIDE + 2 * LABEL_H), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), caption, fill="black")
    for k, (label, path) in enumerate(panels):
        with Image.open(path) as im:
            sheet.paste(im.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.NEAREST), (k * THUMB_SIDE, LABEL_H))
        draw.text((k * THUMB_SIDE + 8, THUMB_SIDE + LABEL_H + 6), label, fill="black")
    sheet.save(WORKFLOW_DIR / f"{name}.jpg", quality=90)
