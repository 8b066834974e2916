"""`make demo`: run the default example workflow on the embedded toy-world model through ComfyUI's
HTTP API, save the result image and print its path as the last line.

The workflow is the UI-format file users open; its checkpoint loader is swapped for the pack's
toy-world loader (same outputs) and its input image for a toy-world scene, then the server runs it.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import make_workflows  # noqa: E402
import workflow_tools  # noqa: E402

import comfy_host  # noqa: E402

DEMO_IMAGE = "attn_edit_demo.png"
log = logging.getLogger("attention_edit.demo")


def demo_prompt(workflow: dict, model_file: str, image_name: str) -> dict:
    """The API prompt of a UI workflow, pointed at the toy-world model and a toy-world image."""
    from attention_edit.nodes import NODES

    classes = dict(workflow_tools.host_node_classes())
    classes.update({n.define_schema().node_id: n for n in NODES})
    prompt = workflow_tools.ui_to_api(workflow, classes)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "AttnEdit_ToyModelLoader"
            node["inputs"] = {"model_name": model_file}
        elif node["class_type"] == "LoadImage":
            node["inputs"]["image"] = image_name
    return prompt


def write_demo_image(path: pathlib.Path) -> None:
    from PIL import Image

    from toyworld import scenes

    circle = scenes.ObjectSpec(shape="circle", colour="red", size="large", position="center", cx=64, cy=64, r=24)
    image, _ = scenes.render(scenes.Scene(background="white", objects=(circle,)))
    Image.fromarray(image).save(path)


def main() -> int:
    out_dir = REPO / "out"
    out_dir.mkdir(exist_ok=True)
    # The user sees the demo's own lines; what the host says while its nodes load in this process goes to
    # a file (the server's own log is written beside its base directory and named at the end).
    host_log = out_dir / "demo-host.log"
    logging.basicConfig(level=logging.INFO, filename=host_log, filemode="w",
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("demo: %(message)s"))
    log.addHandler(console)
    comfy_host.add_host_to_path()
    comfy_host.register_pack()
    from attention_edit.toyworld.model import demo_model_file

    model_path = pathlib.Path(demo_model_file(str(REPO / "models")))
    log.info("model: %s", model_path.name)
    base = pathlib.Path.home() / ".cache" / "attention-edit" / "demo-base"
    comfy_host.prepare_base_directory(base)
    write_demo_image(base / "input" / DEMO_IMAGE)
    workflow_file = REPO / "workflows" / f"{make_workflows.DEMO_WORKFLOW}.json"
    prompt = demo_prompt(json.loads(workflow_file.read_text()), model_path.name, DEMO_IMAGE)
    log.info("workflow: %s; starting ComfyUI", workflow_file.relative_to(REPO))
    server = comfy_host.ComfyServer(base)
    log.info("ComfyUI %s at %s (its log: %s); running the workflow", comfy_host.host_version(), server.url,
             server.log_path)
    with server:
        entry = server.run(prompt, timeout=900)
        files = server.output_files(entry)
    if not files:
        raise SystemExit("demo: the workflow produced no image")
    edited = [f for f in files if "edited" in f.name] or files
    results = []
    for f in files:
        target = out_dir / f.name
        shutil.copyfile(f, target)
        results.append(target)
    log.info("outputs: %s", ", ".join(str(r.relative_to(REPO)) for r in results))
    print(out_dir / edited[0].name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
