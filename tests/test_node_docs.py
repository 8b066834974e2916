"""Every node has a help page where ComfyUI's node documentation panel looks for it, and it is complete.

The 1.32.9 frontend (comfyui_frontend_package, NodeHelpService.fetchCustomNodeHelp) fetches, for a
node whose python_module is "custom_nodes.<pack folder>":

    /extensions/<pack folder>/docs/<node id>/<locale>.md     first, then
    /extensions/<pack folder>/docs/<node id>.md              as the fallback for every locale

and the host serves the pack's WEB_DIRECTORY ("./web") at /extensions/<pack folder>/. So the page of
node X is web/docs/X.md (optional locale variants web/docs/X/<locale>.md). These tests check the
frontend's lookup, then each page against the node's V3 schema. Fast: no server, no browser.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re

import pytest

from attention_edit.nodes import NODES

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEMAS = {node.define_schema().node_id: node.define_schema() for node in NODES}
REQUIRED_SECTIONS = ("## When to use it", "## Inputs", "## Outputs", "## Typical wiring", "## Paper", "## Known limits")


def web_directory() -> pathlib.Path:
    """The pack's WEB_DIRECTORY, read from its __init__.py (which needs the host to import)."""
    tree = ast.parse((REPO / "__init__.py").read_text(encoding="utf-8"))
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "WEB_DIRECTORY" for t in stmt.targets):
            return (REPO / ast.literal_eval(stmt.value)).resolve()
    raise AssertionError("__init__.py sets no WEB_DIRECTORY: the host would serve no docs")


DOCS = web_directory() / "docs"


def doc_path(node_id: str) -> pathlib.Path:
    """The file behind /extensions/<pack folder>/docs/<node id>.md, the frontend's all-locale fallback."""
    return DOCS / f"{node_id}.md"


def served_pages(node_id: str) -> list[pathlib.Path]:
    """Every page the panel can show for the node: the fallback and any <node id>/<locale>.md."""
    variants = sorted((DOCS / node_id).glob("*.md")) if (DOCS / node_id).is_dir() else []
    return [doc_path(node_id), *variants]


def section(text: str, heading: str) -> str:
    """The body of the level-2 section `heading` (up to the next level-1 or level-2 heading)."""
    match = re.search(rf"^{re.escape(heading)}[^\n]*\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"no '{heading}' section"
    return match.group(1)


def items(body: str) -> dict[str, str]:
    """Top-level list items that start with a code span, keyed by it: "- `name` ..." plus continuation lines."""
    found = {}
    for match in re.finditer(r"^- `([^`]+)`(.*?)(?=^- |^\S|\Z)", body, re.M | re.S):
        found[match.group(1)] = " ".join(match.group(2).split())
    return found


def shown_output_name(output) -> str:
    """The name ComfyUI shows on an output socket: its display name, else its type (as in get_v1_info)."""
    return output.display_name or output.io_type


def default_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def test_frontend_fetches_custom_node_docs_from_the_extension_folder():
    spec = importlib.util.find_spec("comfyui_frontend_package")
    assert spec is not None and spec.origin is not None, \
        "comfyui_frontend_package (the host's frontend) is missing: run `make setup`"
    assets = pathlib.Path(spec.origin).parent / "static" / "assets"
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(assets.glob("*.js"))]
    sources = [s for s in sources if "fetchCustomNodeHelp" in s]
    assert sources, f"no frontend bundle under {assets} defines fetchCustomNodeHelp"
    locale = re.compile(r"`/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}/\$\{\w+\}\.md`")
    fallback = re.compile(r"`/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}\.md`")
    for text in sources:
        first, second = locale.search(text), fallback.search(text)
        if first and second:
            assert first.start() < second.start(), "the locale page should be tried before the fallback"
            return
    raise AssertionError("the frontend no longer fetches /extensions/<pack>/docs/<node>[/<locale>].md: update web/docs")


def test_docs_live_in_the_served_web_directory():
    assert DOCS.is_dir(), f"{DOCS} is missing"
    assert REPO in DOCS.parents, "WEB_DIRECTORY must be inside the pack"


def test_no_page_without_a_node():
    orphans = sorted(p.stem for p in DOCS.glob("*.md") if p.stem not in SCHEMAS)
    assert not orphans, f"pages for nodes that are not registered: {orphans}"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_exists_for_every_node(node_id):
    assert doc_path(node_id).is_file(), f"{node_id}: no help page at {doc_path(node_id).relative_to(REPO)}"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_names_the_node_and_has_every_section(node_id):
    schema = SCHEMAS[node_id]
    for page in served_pages(node_id):
        text = page.read_text(encoding="utf-8")
        first = next((line for line in text.splitlines() if line.strip()), "")
        assert re.match(r"# \S", first), f"{page.name}: must start with a level-1 heading, got {first!r}"
        title = first[2:].strip()
        assert title in (schema.display_name, node_id), f"{page.name}: heading {title!r} is not the node's name"
        assert f"`{node_id}`" in text, f"{page.name}: the node id {node_id} is not mentioned"
        for heading in REQUIRED_SECTIONS:
            assert re.search(rf"^{re.escape(heading)}", text, re.M), f"{page.name}: no '{heading}' section"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_documents_every_input_with_type_and_default(node_id):
    schema = SCHEMAS[node_id]
    for page in served_pages(node_id):
        documented = items(section(page.read_text(encoding="utf-8"), "## Inputs"))
        ids = [i.id for i in schema.inputs]
        assert sorted(documented) == sorted(ids), f"{page.name}: documented inputs {sorted(documented)} != schema {ids}"
        for inp in schema.inputs:
            # "- `id` (TYPE, default X, ...): meaning": the parenthesis says type, default and optionality.
            head = re.match(r"\s*\(([^)]*)\)", documented[inp.id])
            assert head, f"{page.name}: input {inp.id} should start with '(TYPE, ...)'"
            head = head.group(1)
            io_type = str(inp.get_io_type())
            assert re.match(rf"{re.escape(io_type)}\b", head), f"{page.name}: input {inp.id} should give its type {io_type}"
            default = getattr(inp, "default", None)
            if default is not None:
                assert "default" in head and default_text(default) in head, \
                    f"{page.name}: input {inp.id} should give its default {default_text(default)}"
            assert ("optional" in head) == bool(inp.optional), f"{page.name}: input {inp.id} optional is {inp.optional}"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_documents_every_output_with_type(node_id):
    schema = SCHEMAS[node_id]
    for page in served_pages(node_id):
        documented = items(section(page.read_text(encoding="utf-8"), "## Outputs"))
        names = [shown_output_name(o) for o in schema.outputs]
        assert sorted(documented) == sorted(names), f"{page.name}: documented outputs {sorted(documented)} != {names}"
        for out in schema.outputs:
            assert f"({out.io_type})" in documented[shown_output_name(out)], \
                f"{page.name}: output {shown_output_name(out)} should give its type {out.io_type}"
            if out.id is not None:
                assert f"`{out.id}`" in documented[shown_output_name(out)] or out.id == shown_output_name(out), \
                    f"{page.name}: output id {out.id} is not mentioned"
