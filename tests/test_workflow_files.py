"""Every example workflow is UI format, generated from scripts/make_workflows.py, with a thumbnail."""

import json
import pathlib

import pytest

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 6


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_with_thumbnail(path):
    workflow = json.loads(path.read_text())
    assert {"nodes", "links", "version"} <= set(workflow)  # what the frontend saves, not an API prompt
    assert any(n["type"].startswith("AttnEdit_") for n in workflow["nodes"])
    assert path.with_suffix(".jpg").exists() or path.with_suffix(".png").exists()


def _without_unlinked_outputs(workflow: dict) -> dict:
    """The workflow less output slots nothing connects to: the part of a saved file that differs between
    hosts whose stock nodes gained an output (0.33.0's SaveImage has one that 0.3.75 lacks)."""
    nodes = [dict(n, outputs=[o for o in n["outputs"] if o["links"]]) for n in workflow["nodes"]]
    return dict(workflow, nodes=nodes)


def test_files_match_their_generator():
    import make_workflows

    import comfy_host

    exact = comfy_host.host_version() == make_workflows.GENERATOR_HOST
    for name in make_workflows.WORKFLOWS:
        built = make_workflows.build(name)
        on_disk = json.loads((pathlib.Path(make_workflows.REPO) / "workflows" / f"{name}.json").read_text())
        if not exact:  # on another host: the same graph, every input, widget and link as this host lays it out
            built, on_disk = _without_unlinked_outputs(built), _without_unlinked_outputs(on_disk)
        assert built == on_disk, f"workflows/{name}.json is stale: run scripts/make_workflows.py"


def _api_prompt(path: pathlib.Path) -> dict:
    """The API prompt of a workflow file (widgets matched to inputs by the host's and the pack's classes)."""
    import workflow_tools

    from attention_edit.nodes import NODES

    classes = dict(workflow_tools.host_node_classes())
    classes.update({n.define_schema().node_id: n for n in NODES})
    return workflow_tools.ui_to_api(json.loads(path.read_text()), classes)


def _family(prompt: dict) -> str:
    names = [n["inputs"]["ckpt_name"].lower() for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    return "flux" if any("flux" in n for n in names) else "sd3" if any("sd3" in n for n in names) else "unet"


@pytest.mark.parametrize("name", ["flux_real_edit", "sd35_real_edit"])
def test_dit_workflows_use_the_documented_guidance(name):
    """web/docs/AttnEdit_DDIMInversion.md, 'On Flux and SD3.5': Flux-dev inverts and edits at cfg 1 with its
    distilled guidance in the prompt (the inversion's FluxGuidance, the source's and the target's at one
    value); SD3.5 inverts at cfg 1 and edits with real CFG."""
    prompt = _api_prompt(pathlib.Path(__file__).resolve().parents[1] / "workflows" / f"{name}.json")
    inversions = [n for n in prompt.values() if n["class_type"] == "AttnEdit_DDIMInversion"]
    samplers = [n for n in prompt.values() if n["class_type"] == "AttnEdit_EditSampler"]
    assert inversions and len(samplers) == 1
    assert all(n["inputs"]["cfg"] == 1.0 for n in inversions)
    sampler = samplers[0]["inputs"]
    if name == "flux_real_edit":
        assert _family(prompt) == "flux"
        assert sampler["cfg"] == 1.0
        guided = [prompt[link[0]] for link in [n["inputs"]["positive"] for n in inversions]
                  + [sampler["source"], sampler["target"]]]
        assert all(n["class_type"] == "FluxGuidance" for n in guided), [n["class_type"] for n in guided]
        assert len({n["inputs"]["guidance"] for n in guided}) == 1
    else:
        assert _family(prompt) == "sd3"
        assert sampler["cfg"] > 1.0
        assert "FluxGuidance" not in {n["class_type"] for n in prompt.values()}
