"""The pack's methods on joint attention (Flux, SD3.5): text and image tokens in one softmax.

Tensors are [batch, heads, tokens, head dim]. `attend(q, k, v)` is the host's attention kernel in that
layout (softmax(q k^T / sqrt(d)) v, whatever kernel runs it), so no map is built. `img` is the slice
of the image tokens; every other key (the text tokens, and any reference-image tokens after the image,
as in Flux Kontext) is "other".

Notation for one image query i: P_ij = softmax_j(s_ij) over all keys j, s_ij = q_i . k_j / sqrt(d);
m_i = sum_{j other} P_ij, the mass the query gives the text. Every formula below is written per query
and evaluated for all queries at once through the kernel:

* m = attend(q, k, 1_other): with V = the indicator of the other keys (every channel), the output is
  exactly sum_j P_ij [j other] = m_i.
* attention over a subset S of the keys is attend(q, k_S, v_S) (its own softmax over S).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

KEEP_MASS = "keep_mass"
MEAN_KEYS = "mean_keys"
UNIFORM_VARIANTS = (KEEP_MASS, MEAN_KEYS)


def other_keys(t: torch.Tensor, img: slice) -> torch.Tensor:
    """The tokens outside `img` (text first, then anything after the image)."""
    return torch.cat([t[:, :, :img.start], t[:, :, img.stop:]], dim=2)


def other_mass(attend: Attend, q: torch.Tensor, k: torch.Tensor, img: slice) -> torch.Tensor:
    """m (batch, heads, queries, 1): each query's attention mass on the keys outside `img`."""
    ind = torch.ones(k.shape[0], k.shape[1], k.shape[2], k.shape[3], dtype=q.dtype, device=q.device)
    ind[:, :, img] = 0
    return attend(q, k, ind)[..., :1]


def uniform_text_keep_mass(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           txt: slice, full: torch.Tensor) -> torch.Tensor:
    """UAM on joint attention, mass kept: the query's probabilities over the T text tokens become m_i / T
    each (m_i = its own mass on the text), the image part is untouched:

        out_i = sum_{j img} P_ij v_j + m_i * mean_{j txt} v_j
              = full_i - m_i * A_txt(q_i) + m_i * mean_txt(v)

    with A_txt the attention over the text keys alone (sum_{j txt} P_ij v_j = m_i A_txt). `full` is the
    normal output for these queries; q holds only the queries to change.
    """
    k_t, v_t = k[:, :, txt], v[:, :, txt]
    ind = torch.zeros_like(v)
    ind[:, :, txt] = 1
    m = attend(q, k, ind)[..., :1]
    return full + m * (v_t.mean(dim=2, keepdim=True) - attend(q, k_t, v_t))


def uniform_text_mean_keys(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           txt: slice) -> torch.Tensor:
    """UAM on joint attention, mass not kept: every text key and value replaced by their means.

    Each text token then has the same score q . mean(k_txt) / sqrt(d) = mean_j s_ij (scores are linear
    in k) and the same value mean(v_txt): probabilities uniform over the text, and the text's mass
    T exp(mean s) / Z' (at most m_i, by Jensen) no longer depends on which token says what.
    """
    k2, v2 = k.clone(), v.clone()
    k2[:, :, txt] = k[:, :, txt].mean(dim=2, keepdim=True)
    v2[:, :, txt] = v[:, :, txt].mean(dim=2, keepdim=True)
    return attend(q, k2, v2)


def fpe_joint(attend: Attend, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, img: slice,
              q_s: torch.Tensor, k_s: torch.Tensor) -> torch.Tensor:
    """Free-Prompt-Editing on joint attention for the target's image queries.

    FPE replaces the target's self-attention map (image -> image) by the source's and keeps the target's
    cross-attention (image -> text: its prompt). In one softmax: the target keeps its own mass m_i on the
    other keys and its own distribution there, and spreads the rest, 1 - m_i, over the image keys as the
    source's queries and keys do (the source's image-image softmax), applied to the target's values:

        out_i = m_i * A_other(q_t_i) + (1 - m_i) * softmax_j(q_s_i . k_s_j / sqrt(d))_{j img} v_t_j

    q_t: the target's image queries; k_t, v_t: all its keys and values; q_s, k_s: the source's image
    queries and image keys.
    """
    m = other_mass(attend, q_t, k_t, img)
    o_other = attend(q_t, other_keys(k_t, img), other_keys(v_t, img))
    o_img = attend(q_s, k_s, v_t[:, :, img])
    return m * o_other + (1 - m) * o_img


def masactrl_joint(k_t: torch.Tensor, v_t: torch.Tensor, img: slice, k_s: torch.Tensor,
                   v_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MasaCtrl's mutual self-attention on joint attention: the target queries the source's image keys and
    values (the source's content) next to its own text keys and values (its prompt):
    attention(Q_t, [K_t_txt, K_s_img], [V_t_txt, V_s_img]). Returns the substituted keys and values."""
    k2, v2 = k_t.clone(), v_t.clone()
    k2[:, :, img] = k_s.to(k2)
    v2[:, :, img] = v_s.to(v2)
    return k2, v2


def image_text_probabilities(q: torch.Tensor, k: torch.Tensor, txt: slice) -> torch.Tensor:
    """The image queries' attention probabilities over the text tokens, averaged over heads, in fp32:
    (batch, queries, text tokens) from q (batch, heads, queries, d) and all keys k (batch, heads, keys, d).

    The softmax runs over the full joint key set (text, image and any reference tokens), as the model's own
    attention does, and only then are the text columns kept: P_ij = softmax_j(q_i . k_j / sqrt(d)), j in txt.
    One head at a time, so the scores of a single head are the largest tensor held.
    """
    total = None
    for h in range(q.shape[1]):
        scores = torch.matmul(q[:, h].float(), k[:, h].float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        p = torch.softmax(scores, dim=-1)[..., txt]
        total = p if total is None else total + p
    return total / q.shape[1]
