"""The live host lists every node of the pack, documented, under attention_edit/, and imported cleanly."""

from __future__ import annotations

import pathlib
import re

import pytest

from attention_edit.nodes import NODES

NODE_IDS = [cls.define_schema().node_id for cls in NODES]
# design.md §3: fixed ids that exist today (the rest of the table is still to come).
FIXED_IDS = ["AttnEdit_DDIMInversion", "AttnEdit_UniformAttention", "AttnEdit_SelfAttentionInjection",
             "AttnEdit_EditSampler"]
REPO = pathlib.Path(__file__).resolve().parents[2]
# How the pack shows up in the host's log: its custom_nodes path, its module name or its real path. (The
# host tree itself lives under ~/.cache/attention-edit/, so a bare "attention-edit" would match the host.)
PACK_MARKERS = ("custom_nodes/attention-edit", "custom_nodes.attention-edit", f"{REPO}/")


def test_pack_declares_its_nodes():
    assert NODE_IDS, "attention_edit.nodes.NODES is empty"
    assert len(set(NODE_IDS)) == len(NODE_IDS), f"duplicate node ids: {NODE_IDS}"
    bad = [i for i in NODE_IDS if not i.startswith("AttnEdit_")]
    assert not bad, f"node ids without the AttnEdit_ prefix: {bad}"


def test_every_pack_node_is_served(object_info):
    served = sorted(k for k in object_info if k.startswith("AttnEdit_"))
    missing = sorted(set(NODE_IDS) - set(served))
    assert not missing, f"in NODES but not in GET /object_info: {missing}"
    extra = sorted(set(served) - set(NODE_IDS))
    assert not extra, f"AttnEdit_ nodes served that are not in NODES: {extra}"


@pytest.mark.parametrize("node_id", FIXED_IDS)
def test_fixed_ids_present(object_info, node_id):
    assert node_id in object_info, f"fixed node id {node_id} (design.md §3) is missing from /object_info"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_is_documented(object_info, node_id):
    info = object_info[node_id]
    assert info["name"] == node_id
    assert info.get("python_module") == "custom_nodes.attention-edit", info.get("python_module")
    assert (info.get("display_name") or "").strip(), f"{node_id}: empty display_name"
    assert (info.get("description") or "").strip(), f"{node_id}: empty description"
    category = info.get("category") or ""
    assert category == "attention_edit" or category.startswith("attention_edit/"), \
        f"{node_id}: category {category!r} is not under attention_edit/"
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    assert inputs, f"{node_id}: no inputs"
    no_tooltip = [name for name, spec in inputs.items()
                  if len(spec) < 2 or not str(spec[1].get("tooltip") or "").strip()]
    assert not no_tooltip, f"{node_id}: inputs without a tooltip: {no_tooltip}"
    assert info["output"], f"{node_id}: no outputs"
    tips = info.get("output_tooltips") or []
    no_out_tip = [i for i, _ in enumerate(info["output"]) if i >= len(tips) or not (tips[i] or "").strip()]
    assert not no_out_tip, f"{node_id}: outputs without a tooltip (indices): {no_out_tip}"


def _tracebacks(log: str) -> list[str]:
    """Each 'Traceback ...' block of the log, through its final exception line."""
    blocks, lines, i = [], log.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("Traceback (most recent call last)"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            blocks.append("\n".join(lines[i:j + 1]))
            i = j + 1
        else:
            i += 1
    return blocks


def test_pack_imported_without_errors(startup_log):
    pack_path = "custom_nodes/attention-edit"
    timing = [line for line in startup_log.splitlines() if re.search(r"seconds.*: ", line) and line.endswith(pack_path)]
    assert timing, f"the host never reported importing the pack ({pack_path}):\n{startup_log[-4000:]}"
    assert not any("IMPORT FAILED" in line for line in timing), f"the pack failed to import: {timing}"
    cannot = [line for line in startup_log.splitlines()
              if "Cannot import" in line and any(m in line for m in PACK_MARKERS)]
    assert not cannot, "\n".join(cannot)
    failed = [line for line in startup_log.splitlines()
              if "IMPORT FAILED" in line and any(m in line for m in PACK_MARKERS)]
    assert not failed, "\n".join(failed)
    ours = [tb for tb in _tracebacks(startup_log) if any(m in tb for m in PACK_MARKERS)]
    assert not ours, "tracebacks mentioning the pack at start-up:\n\n" + "\n\n".join(ours)
