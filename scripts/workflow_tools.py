"""Example workflows as code: build UI-format workflow JSON from a compact graph, and convert a UI-format
workflow to an API prompt (what `make demo` queues; the browser test uses the frontend's own conversion).

A compact graph is {node_id: (class_type, {input: value or (source_node_id, output_index)}, title)}.
Input definitions come from the node classes themselves (stock and ours), so sockets and widget order
always match the host.
"""

from __future__ import annotations

import json
import pathlib

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def host_node_classes() -> dict:
    """Every stock node class of the host (core and comfy_extras), loaded in this process once."""
    import asyncio

    import nodes

    if "MaskToImage" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_builtin_extra_nodes())
    return nodes.NODE_CLASS_MAPPINGS


_node_classes = host_node_classes


def _inputs(cls) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in the order the frontend lays them out."""
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0]
            kind = "COMBO" if isinstance(kind, list) else kind
            out.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return out


def _outputs(cls) -> list[tuple[str, str]]:
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return list(zip(names, cls.RETURN_TYPES))


def build_ui_workflow(graph: dict, classes: dict | None = None, extra_classes: dict | None = None) -> dict:
    """A UI-format workflow (what the frontend saves) from a compact graph."""
    classes = dict(classes or _node_classes())
    classes.update(extra_classes or {})
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    positions = _layout(graph)
    for node_id, (class_type, values, *rest) in graph.items():
        cls = classes[class_type]
        ui_inputs, widgets = [], []
        for name, kind, options in _inputs(cls):
            value = values.get(name, options.get("default"))
            is_link = isinstance(value, tuple)
            if kind in WIDGET_TYPES:
                if is_link:
                    raise ValueError(f"{class_type}.{name}: widget inputs converted to links are not supported here")
                if value is None and kind == "COMBO":
                    value = cls.INPUT_TYPES().get("required", {}).get(name, [[None]])[0][0]
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if options.get("image_upload"):  # the frontend adds an 'upload' widget saved as "image"
                    widgets.append("image")
                continue
            entry = {"name": name, "type": kind, "link": None}
            if is_link:
                link_id = len(links) + 1
                src, slot = value
                src_type = _outputs(classes[graph[src][0]])[slot][1]
                links.append([link_id, src, slot, node_id, len(ui_inputs), src_type])
                outgoing.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
            elif name in values:
                raise ValueError(f"{class_type}.{name} is a socket: connect it as (node_id, output_index)")
            ui_inputs.append(entry)
        ui_nodes.append({"id": node_id, "type": class_type, "pos": positions[node_id], "size": [300, 120],
                         "flags": {}, "order": 0, "mode": 0, "inputs": ui_inputs, "outputs": [],
                         "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
                         **({"title": rest[0]} if rest and rest[0] else {})})
    for node in ui_nodes:
        cls = classes[node["type"]]
        node["outputs"] = [{"name": name, "type": kind, "links": outgoing.get((node["id"], i), []), "slot_index": i}
                           for i, (name, kind) in enumerate(_outputs(cls))]
    for order, node in enumerate(_topological(graph)):
        next(n for n in ui_nodes if n["id"] == node)["order"] = order
    return {"last_node_id": max(graph), "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def _topological(graph: dict) -> list[int]:
    done, order = set(), []

    def visit(n):
        if n in done:
            return
        done.add(n)
        for v in graph[n][1].values():
            if isinstance(v, tuple):
                visit(v[0])
        order.append(n)

    for n in graph:
        visit(n)
    return order


def _layout(graph: dict) -> dict[int, list[int]]:
    depth: dict[int, int] = {}
    for n in _topological(graph):
        ups = [depth[v[0]] for v in graph[n][1].values() if isinstance(v, tuple)]
        depth[n] = 1 + max(ups, default=-1)
    rows: dict[int, int] = {}
    pos = {}
    for n in _topological(graph):
        d = depth[n]
        pos[n] = [40 + 380 * d, 40 + 340 * rows.get(d, 0)]  # room for the tallest nodes (KSampler, previews)
        rows[d] = rows.get(d, 0) + 1
    return pos


def ui_to_api(workflow: dict, classes: dict | None = None) -> dict:
    """An API prompt from a UI-format workflow (widgets matched to inputs in the frontend's order)."""
    classes = classes or _node_classes()
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        cls = classes[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, kind, options in _inputs(cls):
            if kind in WIDGET_TYPES:
                if values:
                    inputs[name] = values.pop(0)
                    if options.get("control_after_generate") and values:
                        values.pop(0)
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def write(path: pathlib.Path, workflow: dict) -> None:
    path.write_text(json.dumps(workflow, indent=1) + "\n")
