"""Uniform cross-attention (UAM, arXiv 2411.19652).

With every attention probability replaced by 1/T over the T text tokens, the output is the mean of
V over the tokens, independent of Q: no scores, no softmax, no map.
"""

from __future__ import annotations

import torch


def uniform_attention(v: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Attention output (batch, n_queries, heads*dim) with probabilities 1/T for v (batch, T, heads*dim)."""
    return v.mean(dim=1, keepdim=True).expand(-1, n_queries, -1)
