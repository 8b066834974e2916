"""Attention split into heads, written out: the scores, probabilities and outputs the methods that need
them (instant masks, attention regulation, the toy world's grounding loss) compute explicitly. Every
other attention runs through the host's optimized kernel."""

from __future__ import annotations

import torch


def head_scores(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled scores (B * heads, M, L) float32 from q (B, M, heads * d) and k (B, L, heads * d)."""
    b, m, inner = q.shape
    d = inner // heads
    qh = q.float().reshape(b, m, heads, d).transpose(1, 2).reshape(b * heads, m, d)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2).reshape(b * heads, k.shape[1], d)
    return torch.bmm(qh * d**-0.5, kh.transpose(1, 2))


def heads_output(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs (B * heads, M, L) @ v (B, L, heads * d) -> (B, M, heads * d), float32."""
    b, length, inner = v.shape
    d = inner // heads
    vh = v.float().reshape(b, length, heads, d).transpose(1, 2).reshape(b * heads, length, d)
    out = torch.bmm(probs, vh)
    return out.reshape(b, heads, -1, d).transpose(1, 2).reshape(b, -1, inner)


def head_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, float32: (B, heads, M, L)."""
    scores = head_scores(q, k, heads)
    return torch.softmax(scores, dim=-1).reshape(q.shape[0], heads, q.shape[1], k.shape[1])
