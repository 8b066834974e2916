"""Which batch rows of a model call belong to which branch of an edit.

The edit sampler stacks its branches (source, target, auxiliary reconstruction) in one latent
batch, branch-major: rows [b * images + i] for branch b and image i. ComfyUI then concatenates one
such batch per cond chunk (cond, uncond, ...) and may split chunks over several calls, so the rows
are derived per call from the call's own batch size, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "source"
TARGET = "target"
AUX = "aux"  # UAM's auxiliary uniform-attention reconstruction branch
INVERSION = "inversion"


@dataclass(frozen=True)
class BranchLayout:
    branches: tuple[str, ...]
    images: int

    @property
    def rows_per_chunk(self) -> int:
        return len(self.branches) * self.images

    def rows(self, branch: str, batch: int) -> list[int]:
        """Rows of `branch` in a call whose batch is `batch`; [] if the branch is absent."""
        if branch not in self.branches or batch % self.rows_per_chunk:
            return []
        b = self.branches.index(branch)
        return [c * self.rows_per_chunk + b * self.images + i
                for c in range(batch // self.rows_per_chunk) for i in range(self.images)]
