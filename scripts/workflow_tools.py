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


def build_ui_workflow(graph: dict, classes: dict | None = None, extra_classes: dict | None = None,
                      groups: list[tuple[str, list[int]]] | None = None, note: str | None = None) -> dict:
    """A UI-format workflow (what the frontend saves) from a compact graph.

    groups: (title, node ids) in the order the data flows: each becomes a titled group, laid out left to
    right (see _group_layout); the ids may instead be a list of columns (lists of ids), left to right;
    note: the text of a Note node placed above the first group.
    """
    classes = dict(classes or _node_classes())
    classes.update(extra_classes or {})
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    sizes = {n: node_size(classes[spec[0]], spec[0], _shown_title(classes[spec[0]], spec)) for n, spec in graph.items()}
    if groups:
        sockets = {n: [name for name, kind, _ in _inputs(classes[spec[0]]) if kind not in WIDGET_TYPES]
                   for n, spec in graph.items()}
        positions, ui_groups = _group_layout(graph, sizes, groups, sockets)
    else:
        positions, ui_groups = _layout(graph), []
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
        ui_nodes.append({"id": node_id, "type": class_type, "pos": positions[node_id], "size": sizes[node_id],
                         "flags": {}, "order": 0, "mode": 0, "inputs": ui_inputs, "outputs": [],
                         "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
                         **({"title": rest[0]} if rest and rest[0] else {})})
    for node in ui_nodes:
        cls = classes[node["type"]]
        node["outputs"] = [{"name": name, "type": kind, "links": outgoing.get((node["id"], i), []), "slot_index": i}
                           for i, (name, kind) in enumerate(_outputs(cls))]
    for order, node in enumerate(_topological(graph)):
        next(n for n in ui_nodes if n["id"] == node)["order"] = order
    last_id = max(graph)
    if note:
        last_id += 1
        top = min((g["bounding"][1] for g in ui_groups), default=0)
        left = min((g["bounding"][0] for g in ui_groups), default=0)
        ui_nodes.append({"id": last_id, "type": NOTE, "pos": [left, top - NOTE_SIZE[1] - 2 * GAP], "size": list(NOTE_SIZE),
                         "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [note], "title": "Start here"})
    return {"last_node_id": last_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": ui_groups, "config": {}, "extra": {}, "version": 0.4}


NOTE = "Note"  # the frontend's own note node: no server class, not part of the API prompt
VIRTUAL_TYPES = (NOTE, "MarkdownNote")
NOTE_SIZE = (520, 150)
GAP = 40  # between nodes in a group, and the group's padding
GROUP_GAP = 120  # between groups
GROUP_TITLE = 80  # the group title bar and the first node title
TITLE_H, SLOT_H, WIDGET_H = 30, 21, 25
MULTILINE_H = 100
PREVIEW_H = 290  # nodes that show an image: room for it
PREVIEW_TYPES = ("SaveImage", "PreviewImage")
WIDE_TYPES = {"AttnEdit_EditPrompts": 420, "AttnEdit_EditSampler": 420, "KSampler": 320}


def _shown_title(cls, spec: tuple) -> str:
    """The title the frontend shows on a node: the graph's title, else the class's display name."""
    if len(spec) > 2 and spec[2]:
        return spec[2]
    schema = getattr(cls, "define_schema", None)
    if schema is not None:
        return schema().display_name or spec[0]
    import nodes

    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(spec[0], spec[0])


# The frontend widens a node to fit its title: about 6 px a character (its 14 px title font) and 58 px of
# padding and dot in 1.48.7; a little more here so the saved width is never the smaller.
TITLE_CHAR_W, TITLE_PAD = 7, 70


def node_size(cls, class_type: str, title: str = "") -> list[int]:
    """A node's size on the canvas: at least what the frontend computes for its title, sockets and widgets
    (measured in 1.30.6 and 1.48.7), so the saved layout is the layout users see."""
    inputs = _inputs(cls)
    sockets = sum(1 for _, kind, _ in inputs if kind not in WIDGET_TYPES)
    widgets = [(kind, options) for _, kind, options in inputs if kind in WIDGET_TYPES]
    rows = max(sockets, len(_outputs(cls)))
    height = TITLE_H + SLOT_H * rows + 10
    for _, options in widgets:
        height += MULTILINE_H if options.get("multiline") else WIDGET_H
        if options.get("control_after_generate"):
            height += WIDGET_H
        if options.get("image_upload"):
            height += WIDGET_H + PREVIEW_H
    if class_type in PREVIEW_TYPES:
        height += PREVIEW_H
    if class_type == "AttnEdit_EditSampler":
        height += REPORT_H  # the edit report the pack's web extension shows under the widgets
    width = max(WIDE_TYPES.get(class_type, 300), TITLE_CHAR_W * len(title) + TITLE_PAD)
    return [-(-width // 10) * 10, height]


REPORT_H = 230


def _slot_y(index: int) -> int:
    """How far below a node's top its socket row `index` lies, at most (the frontend: about 20 px a row)."""
    return (index + 1) * SLOT_H + 10


def _group_layout(graph: dict, sizes: dict, groups: list[tuple[str, list[int]]], sockets: dict):
    """Groups left to right in the order given; inside a group, columns by the depth of its own links. A group
    that links between earlier and later groups pass by sits below those links, so no link crosses a group
    it does not connect (the frontend draws a link as a curve inside the box of its two ends)."""
    flat = [[n for item in ids for n in (item if isinstance(item, list) else [item])] for _, ids in groups]
    member = {n: g for g, ids in enumerate(flat) for n in ids}
    missing = set(graph) - set(member)
    if missing:
        raise ValueError(f"nodes in no group: {sorted(missing)}")
    local: dict[int, dict[int, list[int]]] = {}  # group -> relative positions of its nodes
    extent: dict[int, tuple[int, int]] = {}
    for g, (_, ids) in enumerate(groups):
        depth = {}
        for n in _topological(graph):
            if member[n] != g:
                continue
            ups = [depth[v[0]] for v in graph[n][1].values() if isinstance(v, tuple) and member.get(v[0]) == g]
            depth[n] = 1 + max(ups, default=-1)
        columns: dict[int, list[int]] = {}
        if ids and isinstance(ids[0], list):  # explicit columns, left to right, each top to bottom
            columns = dict(enumerate(ids))
        else:
            for n in ids:  # the order given is the order top to bottom
                columns.setdefault(depth[n], []).append(n)
        x, width, height, pos = GAP, 0, 0, {}
        for d in sorted(columns):
            y, col_w = GROUP_TITLE, 0
            for n in columns[d]:
                pos[n] = [x, y]
                y += sizes[n][1] + GAP
                col_w = max(col_w, sizes[n][0])
            height = max(height, y)
            x += col_w + GAP
        width = x
        local[g], extent[g] = pos, (width, height)
    xs, x = [], 0
    for g in range(len(groups)):
        xs.append(x)
        x += extent[g][0] + GROUP_GAP
    tops = [0] * len(groups)
    links = [(member[v[0]], v[0], v[1], member[n], n, name) for n, spec in graph.items()
             for name, v in spec[1].items() if isinstance(v, tuple)]

    def in_row(n: int, name: str) -> int:  # a link's input row among the node's sockets
        return sockets[n].index(name)

    for _ in range(len(groups)):  # a group moved down may move the links of the groups it passes
        for b in range(len(groups)):
            lowest = None
            for a, src, slot, c, dst, name in links:
                if a < b < c:  # the link's ends, each at most its node's bottom
                    ends = (tops[a] + local[a][src][1] + min(_slot_y(slot), sizes[src][1]),
                            tops[c] + local[c][dst][1] + min(_slot_y(in_row(dst, name)), sizes[dst][1]))
                    lowest = max(ends) if lowest is None else max(lowest, *ends)
            if lowest is not None:
                tops[b] = max(tops[b], lowest + GAP)
    positions, ui_groups = {}, []
    for g, (title, _) in enumerate(groups):
        for n in flat[g]:
            positions[n] = [xs[g] + local[g][n][0], tops[g] + local[g][n][1]]
        ui_groups.append({"id": g + 1, "title": title, "bounding": [xs[g], tops[g], extent[g][0], extent[g][1]],
                          "color": GROUP_COLOURS[g % len(GROUP_COLOURS)], "font_size": 24, "flags": {}})
    return positions, ui_groups


GROUP_COLOURS = ("#3f789e", "#8A8", "#b58b2a", "#a1309b")


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
        if node.get("mode", 0) in (2, 4) or node["type"] in VIRTUAL_TYPES:  # muted, bypassed, or a note
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
