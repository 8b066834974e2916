"""Every node's V3 schema validates: one bad schema makes the host skip the whole pack."""

import pytest

from attention_edit.nodes import NODES


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.__name__)
def test_schema_validates_and_ids_are_unique(node):
    schema = node.GET_SCHEMA()  # runs the host's own Schema.validate()
    assert schema.node_id.startswith("AttnEdit_")
    ids = [i.id for i in schema.inputs] + [o.id for o in schema.outputs if o.id]
    assert len(ids) == len(set(ids))
