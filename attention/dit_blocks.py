"""Choosing DiT blocks by meaning: kind (double / single) and fraction of the depth.

A DiT block spec is "all" or a comma list of `double`, `single` (Flux's double-stream and single-stream
blocks; SD3's joint blocks count as double), optionally with block numbers (`double:0-3`, `single:5`),
or `depth:a-b`: the blocks whose position in execution order, as a fraction of all blocks, is in
[a, b) (b = 1 includes the last). `depth:0.5-1` means the second half of the network on Flux-dev
(57 blocks) and on SD3.5 large (38) alike.
"""

from __future__ import annotations

from .blocks import numbered_range

DIT_BLOCK_NAMES = ("double", "single")


def parse_dit_block_spec(spec: str) -> list[tuple]:
    """('double'|'single', first, last) and ('depth', lo, hi) items; raises ValueError with a fix."""
    text = (spec or "").strip().lower()
    if text in ("", "all"):
        return [(name, None, None) for name in DIT_BLOCK_NAMES]
    items = []
    for part in text.split(","):
        part = part.strip()
        name, _, numbers = part.partition(":")
        name = name.strip()
        if name == "depth":
            lo, sep, hi = numbers.partition("-")
            try:
                a, b = float(lo), float(hi)
            except ValueError:
                raise ValueError(f"bad depth range in '{part}': expected e.g. 'depth:0.5-1'") from None
            if not (sep and 0.0 <= a < b <= 1.0):
                raise ValueError(f"bad depth range in '{part}': need 0 <= a < b <= 1, e.g. 'depth:0.5-1'")
            items.append(("depth", a, b))
            continue
        if name not in DIT_BLOCK_NAMES:
            raise ValueError(f"unknown DiT block '{part}' in '{spec}': use 'all' or a comma list of double, single "
                             f"(optionally with numbers, e.g. 'double:0-3') or depth:a-b (fractions, e.g. "
                             f"'depth:0.5-1')")
        items.append(numbered_range(part, name, numbers))
    return items


def dit_block_selected(items, kind: str, index: int, order: int, total: int) -> bool:
    """Whether block `index` of `kind`, at position `order` of `total` in execution order, is selected."""
    for name, a, b in items:
        if name == "depth":
            position = order / total
            if a <= position < b or (b == 1.0 and order == total - 1):
                return True
        elif name == kind and (a is None or a <= index <= b):
            return True
    return False
