"""The public API of every AttnEdit_ node, as the live host serves it, must match schema_snapshot.json.

Node ids, input names and socket types (required and optional apart, in order: a UI workflow's
widgets_values is positional) and outputs (type, name, list flag) are what saved workflows depend on.
Tooltips, descriptions, defaults, ranges and combo option lists are left out: they may change freely.

To change the API on purpose, rewrite the snapshot and commit it with the change:

    ATTN_EDIT_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest tests/host/test_schema_snapshot.py
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib

SNAPSHOT = pathlib.Path(__file__).with_name("schema_snapshot.json")
UPDATE_ENV = "ATTN_EDIT_UPDATE_SNAPSHOT"


def _socket_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)  # V1 combos list their options as the type


def public_schema(object_info: dict) -> dict:
    schema = {}
    for node_id in sorted(k for k in object_info if k.startswith("AttnEdit_")):
        info = object_info[node_id]
        entry = {}
        for section in ("required", "optional"):
            specs = info["input"].get(section, {})
            order = info.get("input_order", {}).get(section, list(specs))
            if specs:
                entry[section] = [f"{name}: {_socket_type(specs[name])}" for name in order]
        hidden = info["input"].get("hidden", {})
        if hidden:
            entry["hidden"] = sorted(hidden)
        entry["outputs"] = [f"{name}: {kind}" + (" (list)" if is_list else "")
                            for kind, name, is_list in zip(info["output"], info["output_name"], info["output_is_list"])]
        schema[node_id] = entry
    return schema


def dump(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


def test_schema_matches_snapshot(object_info):
    live = public_schema(object_info)
    assert live, "the host serves no AttnEdit_ node"
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT.write_text(dump(live))
    assert SNAPSHOT.exists(), f"{SNAPSHOT} is missing: run with {UPDATE_ENV}=1 to create it"
    saved = json.loads(SNAPSHOT.read_text())
    if saved == live:
        return
    lines = []
    for node_id in sorted(set(saved) - set(live)):
        lines.append(f"REMOVED node {node_id} (saved workflows using it break)")
    for node_id in sorted(set(live) - set(saved)):
        lines.append(f"NEW node {node_id} (not in the snapshot yet)")
    for node_id in sorted(set(saved) & set(live)):
        if saved[node_id] != live[node_id]:
            lines.append(f"CHANGED {node_id}:")
            lines += difflib.unified_diff(dump(saved[node_id]).splitlines(), dump(live[node_id]).splitlines(),
                                          "snapshot", "live", lineterm="", n=2)
    raise AssertionError(
        "The public node API differs from tests/host/schema_snapshot.json. Ids, input names and socket types "
        "are what saved workflows depend on.\n" + "\n".join(lines) +
        f"\nIf the change is intended, rewrite the snapshot with {UPDATE_ENV}=1 and commit it.")
