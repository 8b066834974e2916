"""Choosing UNet transformer blocks by meaning: block names and map resolution.

A block spec is "all" or a comma list of `input`, `middle`, `output`, optionally with a block
number or range: `output:3-5`, `input:7`. Resolution is the map side relative to the latent side,
from the call's token count, so one setting means the same on SD1.x at 512 px and SDXL at 1024 px.
"""

from __future__ import annotations

BLOCK_NAMES = ("input", "middle", "output")


def parse_block_spec(spec: str) -> list[tuple[str, int | None, int | None]]:
    """Parse a block spec into (name, first, last) ranges; raises ValueError with a fix."""
    text = (spec or "").strip().lower()
    if text in ("", "all"):
        return [(name, None, None) for name in BLOCK_NAMES]
    ranges = []
    for part in text.split(","):
        part = part.strip()
        name, _, numbers = part.partition(":")
        name = name.strip()
        if name not in BLOCK_NAMES:
            raise ValueError(f"unknown block '{part}' in '{spec}': use 'all' or a comma list of "
                             f"input, middle, output with optional numbers, e.g. 'input:7-8, output:3-5'")
        ranges.append(numbered_range(part, name, numbers))
    return ranges


def numbered_range(part: str, name: str, numbers: str) -> tuple[str, int | None, int | None]:
    """(name, first, last) of one spec item `name[:numbers]` (no numbers: every block of that name)."""
    if not numbers:
        return (name, None, None)
    lo, _, hi = numbers.partition("-")
    try:
        first = int(lo)
        last = int(hi) if hi else first
    except ValueError:
        raise ValueError(f"bad block numbers in '{part}': expected e.g. '{name}:3' or '{name}:3-5'") from None
    if first < 0 or last < first:
        raise ValueError(f"bad block range in '{part}': numbers must be >= 0 and ascending")
    return (name, first, last)


def block_selected(ranges, name: str, number: int) -> bool:
    for r_name, first, last in ranges:
        if r_name == name and (first is None or first <= number <= last):
            return True
    return False


def map_size(tokens: int, latent_h: int, latent_w: int) -> tuple[int, int] | None:
    """(height, width) of a UNet attention map with `tokens` positions for a latent of this size.

    Each UNet level halves the side rounding up (stride-2 convolutions with padding 1).
    """
    h, w = int(latent_h), int(latent_w)
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == tokens else None
