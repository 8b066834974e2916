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
