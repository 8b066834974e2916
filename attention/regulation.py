"""Attention regulation (arXiv 2403.06381): steer cross-attention toward target tokens, pure torch.

For the conditional rows of a cross-attention layer, a smooth bias S is added to the pre-softmax
scores of the target tokens. S is a weighted sum of Gaussian bumps over the 2D map (sigma = map
width // 16, centres every 2 sigma); the weights w (one set per row, head and target) are found by
plain gradient descent on

    L(w) = mean_g (q90(A_g) - peak_target)^2
           + share_weight * mean_g (mean(A_g) - min(1, 0.2 n) / n)^2
           + beta * mean(w^2)

where A_g is target g's attention map (its probability, summed over the target's tokens, at every
position of the map) under the biased softmax, q90 its 0.9-quantile over the map and n the number
of targets. As in the official code: the weights start random (uniform in [0, 1), here from a
seeded generator, see `initial_weights`); the iterate kept is the one of lowest loss over all the
call's rows and heads together; the bias applied is ema * (the previous step's optimum, or the
initial bias on the first step) + (1 - ema) * this step's optimum, scaled by decay**step; after the
softmax the start and end tokens get back their unbiased probabilities and nothing is re-normalised
(restore "overwrite"; "renormalise" is the variant that rescales the other tokens to fill the rest).

Everything here runs in float32 whatever the input dtype, and the result is cast back, so a float16
or bfloat16 model gets no NaN from the optimisation. No ComfyUI imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch

from .heads import head_scores, heads_output

RESTORES = ("overwrite", "renormalise")  # the official restore first
BLOCK_CODES = {"input": 1, "middle": 2, "output": 3, "double": 4, "single": 5}  # UNet blocks; DiT blocks


@dataclasses.dataclass(frozen=True)
class RegulationParams:
    """The method's parameters; defaults are the official code's (SD2, 50 steps, 25 edited)."""

    iterations: int = 20  # gradient steps per layer and step (the iterates before each step are scored)
    learning_rate: float = 100.0
    ema: float = 0.25  # weight of the previous step's optimum: S = ema * S_best,prev + (1 - ema) * S_best
    decay: float = 0.99  # the applied bias is decay**step * S
    peak_target: float = 0.9  # what each target map's 0.9-quantile should reach
    share_weight: float = 80.0  # weight of the equal-share term
    beta: float = 0.09  # weight of the mean(w^2) penalty (the official code's 9e-2; the paper says 0.1)
    quantile: float = 0.9
    restore: str = "overwrite"  # start/end tokens after the softmax: "overwrite" (official) or "renormalise"

    def validate(self) -> None:
        if self.restore not in RESTORES:
            raise ValueError(f"restore must be one of {', '.join(RESTORES)}, got {self.restore!r}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        for name in ("learning_rate", "share_weight", "beta"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ema", "decay", "peak_target", "quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def share_target(n: int) -> float:
    """The mean attention each of n targets should get: 0.2 each up to 5 targets, then 1 / n."""
    return min(1.0, 0.2 * n) / n


def bump_sigma(width: int) -> float:
    """The bumps' sigma: width // 16 pixels as in the official code (1 at 16x16, 2 at 32x32, 1 at
    24x24). Maps narrower than 16 (where the official code divides by zero) get width / 16."""
    return float(width // 16) if width >= 16 else width / 16.0


def gaussian_basis(height: int, width: int, device=None) -> torch.Tensor:
    """The bumps G_p flattened, (P, height * width) float32: sigma = bump_sigma(width), centres at
    2 sigma, 4 sigma, ... inside the map on both axes (7 x 7 = 49 bumps on a square map whose side is
    a multiple of 16 or below 16)."""
    sigma = bump_sigma(width)
    step = 2.0 * sigma
    ys = torch.arange(height, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    cy = torch.arange(1, math.ceil(height / step) + 1, dtype=torch.float32, device=device) * step
    cx = torch.arange(1, math.ceil(width / step) + 1, dtype=torch.float32, device=device) * step
    cy, cx = cy[cy < height - 1e-6], cx[cx < width - 1e-6]
    gy = torch.exp(-((ys[None, :] - cy[:, None]) ** 2) / (2 * sigma**2))  # (Py, H)
    gx = torch.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * sigma**2))  # (Px, W)
    return (gy[:, None, :, None] * gx[None, :, None, :]).reshape(len(cy) * len(cx), height * width)


def _index(positions: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(positions, dtype=torch.long, device=device).flatten()


def group_logits(scores: torch.Tensor, groups: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce scores (B, M, L) to the logits the objective needs: (B, 1, M) over the tokens in no
    group, and (B, n, M) per group (logsumexp over the group's tokens). The softmax over dim 1 of
    [rest, groups + S] gives every target's summed probability under a bias S on all of its tokens."""
    in_group = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    per_group = []
    for g in groups:
        in_group[g] = True
        per_group.append(torch.logsumexp(scores[..., g], dim=-1))
    rest = torch.logsumexp(scores.masked_fill(in_group, float("-inf")), dim=-1)
    return rest.unsqueeze(1), torch.stack(per_group, dim=1)


def target_maps(rest: torch.Tensor, grouped: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Every target's attention map (B, n, M) under the bias (B, n, M)."""
    return torch.cat([rest, grouped + bias], dim=1).softmax(dim=1)[:, 1:]


def upper_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q, dim=-1) (linear interpolation) for q >= 0.5, through topk: much cheaper
    than the full sort on small maps, and differentiable the same way (through two order statistics)."""
    m = x.shape[-1]
    pos = q * (m - 1)
    lo = math.floor(pos)
    frac = pos - lo
    top = torch.topk(x, m - lo, dim=-1, sorted=True).values  # descending; the last is the lo-th smallest
    low = top[..., -1]
    if frac == 0.0 or m - lo < 2:
        return low
    return low + frac * (top[..., -2] - low)


def objective(maps: torch.Tensor, weights: torch.Tensor, params: RegulationParams) -> torch.Tensor:
    """The loss of every row-head, (B,), for target maps (B, n, M) and bump weights (B, n, P)."""
    n = maps.shape[1]
    quantile = upper_quantile(maps, params.quantile) if params.quantile >= 0.5 else \
        torch.quantile(maps, params.quantile, dim=-1)
    peak = ((quantile - params.peak_target) ** 2).mean(dim=-1)
    share = ((maps.mean(dim=-1) - share_target(n)) ** 2).mean(dim=-1)
    return peak + params.share_weight * share + params.beta * (weights**2).mean(dim=(1, 2))


def layer_seed(block: tuple[str, int, int] | None, step: int) -> int:
    """The seed of the initial weights of one layer at one step, fixed so that a run is reproducible:
    ((code * 100 + number) * 100 + index) * 10000 + step, with code 1, 2, 3 for the input, middle and
    output blocks (("input", 7, 0) at step 3: 107000003), 4 and 5 for a DiT's double and single blocks (the
    index then being which attention of the block: ("double", 3, 0) at step 2: 403000002). No block: the
    step alone."""
    if block is None:
        return int(step)
    name, number, index = block
    return ((BLOCK_CODES.get(name, 0) * 100 + int(number)) * 100 + int(index)) * 10000 + int(step)


def initial_weights(rows: int, targets: int, bumps: int, seed: int, device=None) -> torch.Tensor:
    """The starting bump weights (rows, targets, bumps), uniform in [0, 1) like the official torch.rand,
    drawn in float32 on the CPU from torch.Generator().manual_seed(seed) as one tensor of that shape (the
    same on every device). Rows are head_scores' (image, then head); bumps are gaussian_basis' order
    (row centre, then column centre)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(rows, targets, bumps, generator=g, dtype=torch.float32).to(device)


def optimise_bias(scores: torch.Tensor, groups: Sequence[torch.Tensor], basis: torch.Tensor,
                  params: RegulationParams, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The bias maps S (B, n, M) that minimise the objective, by plain gradient descent on the bump
    weights from `weights` (B, n, P) (default: zero): `iterations` steps of size `learning_rate`,
    each row-head on its own loss (the official code's batch-mean loss with the step scaled by the
    batch size). As in the official code the iterates 0 .. iterations - 1 are scored (the last step's
    result is not) and the kept one is the iterate whose loss summed over all rows and heads is
    lowest. float32; autograd runs even under the host's inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        scores = scores.detach().float().clone()
        basis = basis.detach().float().clone()
        rest, grouped = group_logits(scores, groups)
        b, n, m = grouped.shape
        p = basis.shape[0]
        if weights is None:
            weights = torch.zeros(b, n, p, device=scores.device)
        weights = weights.detach().float().clone().to(scores.device).requires_grad_(True)
        best_loss = torch.tensor(float("inf"), device=scores.device)  # a tensor: no device sync per iterate
        best = torch.mm(weights.detach().reshape(b * n, p), basis).reshape(b, n, m)
        for _ in range(params.iterations):
            bias = torch.mm(weights.reshape(b * n, p), basis).reshape(b, n, m)
            loss = objective(target_maps(rest, grouped, bias), weights, params)
            total = loss.detach().sum()
            better = total < best_loss
            best_loss = torch.where(better, total, best_loss)
            best = torch.where(better, bias.detach(), best)
            (grad,) = torch.autograd.grad(loss.sum(), weights)
            weights = (weights.detach() - params.learning_rate * grad).requires_grad_(True)
        return best


def regulated_probs(scores: torch.Tensor, groups: Sequence[torch.Tensor], bias: torch.Tensor,
                    keep: torch.Tensor | None = None, restore: str = "overwrite") -> torch.Tensor:
    """Probabilities (B, M, L) with group g's bias (bias[:, g], (B, n, M)) added to all of its tokens'
    scores, and the tokens in `keep` (start and end) at their unbiased probability. restore
    "overwrite" (the official code): the kept tokens' probabilities are written over the biased
    softmax and nothing else changes, so a row no longer sums to one and the targets keep the
    probability the optimisation gave them. "renormalise": the other tokens are rescaled to fill the
    rest (rows sum to one; non-target tokens keep their ratios to each other)."""
    full = torch.zeros_like(scores)
    for i, g in enumerate(groups):
        full[..., g] = bias[:, i, :, None]
    biased = scores + full
    if keep is None or keep.numel() == 0:
        return biased.softmax(dim=-1)
    keep_mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    keep_mask[keep] = True
    if restore == "overwrite":
        return torch.where(keep_mask, scores.softmax(dim=-1), biased.softmax(dim=-1))
    if restore != "renormalise":
        raise ValueError(f"restore must be one of {', '.join(RESTORES)}, got {restore!r}")
    lse_all = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse_rest = torch.logsumexp(scores.masked_fill(keep_mask, float("-inf")), dim=-1, keepdim=True)
    biased_rest = biased.masked_fill(keep_mask, float("-inf"))
    lse_biased_rest = torch.logsumexp(biased_rest, dim=-1, keepdim=True)
    # Non-kept tokens: the biased softmax over them, scaled to the unbiased mass they had together.
    rest = torch.exp(biased_rest - lse_biased_rest + (lse_rest - lse_all))
    return torch.where(keep_mask, torch.exp(scores - lse_all), rest)


@contextlib.contextmanager
def serial_on_cpu(device: torch.device) -> Iterator[None]:
    """One intra-op thread while the tiny tensors of the optimisation are on the CPU: splitting
    kernels of a few thousand elements over threads only adds synchronisation, which costs
    milliseconds per kernel on a busy machine. The host's setting is restored after."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def regulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: Sequence,
             keep: Sequence[int] | torch.Tensor | None, map_hw: tuple[int, int], step: int,
             previous: torch.Tensor | None = None, params: RegulationParams = RegulationParams(),
             basis: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One regulated cross-attention call for the rows given (all of them are regulated).

    q (B, M, heads * d), k and v (B, L, heads * d), already projected, any float dtype. groups: the
    token positions of each target (positions in the context, all occurrences). keep: start and end
    token positions. previous: this layer's optimum from the previous step (B * heads, n, M), or None
    on the first step (then the initial bias, from the weights `initial_weights` draws with `seed`,
    takes its place in the moving average, as in the official code). Returns the attention output
    (dtype of q) and this step's optimum, to pass on as `previous` next step.
    """
    device = q.device
    groups = [_index(g, device) for g in groups]
    keep_index = None if keep is None else _index(keep, device)
    with torch.inference_mode(False), serial_on_cpu(device):
        scores = head_scores(q, k, heads)
        if basis is None:
            basis = gaussian_basis(map_hw[0], map_hw[1], device=device)
        basis = basis.to(device=device, dtype=torch.float32)
        if params.iterations == 0:  # no optimisation: no bias, the layer's attention as it is
            best = torch.zeros(scores.shape[0], len(groups), scores.shape[1], device=device)
            probs = regulated_probs(scores, groups, best, keep_index, params.restore)
            return heads_output(probs, v, heads).to(q.dtype), best
        start = initial_weights(scores.shape[0], len(groups), basis.shape[0], seed, device)
        best = optimise_bias(scores, groups, basis, params, start)
        if previous is not None and previous.shape == best.shape:
            partner = previous.to(device=device, dtype=torch.float32)
        else:  # the first step: the bias of the initial weights
            partner = torch.mm(start.reshape(-1, basis.shape[0]), basis).reshape(best.shape)
        smoothed = params.ema * partner + (1.0 - params.ema) * best
        applied = smoothed * (params.decay ** int(step))
        probs = regulated_probs(scores, groups, applied, keep_index, params.restore)
        out = heads_output(probs, v, heads)
    return out.to(q.dtype), best


def regulate_joint(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, txt: slice, groups: Sequence,
                   keep: Sequence[int] | torch.Tensor | None, map_hw: tuple[int, int], step: int,
                   previous: torch.Tensor | None = None, params: RegulationParams = RegulationParams(),
                   basis: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Regulation on a joint attention (Flux, SD3): the image queries' block over the text keys is regulated
    as `regulate` regulates a cross-attention, and the rest of the softmax is left as it is.

    For image query i with joint probabilities P_ij over all keys (text, image, anything after the image) and
    text mass m_i = sum_{j txt} P_ij, the text block P_ij = m_i * C_ij, C_ij = softmax_{j txt}(s_ij) (the
    query's cross-attention to the prompt). Regulation replaces C by the regulated C' (bias on the target
    tokens' scores, optimised on C's maps, start / end tokens restored: `regulate` on the text keys alone):

        out_i = sum_{j not txt} P_ij v_j + m_i * sum_{j txt} C'_ij v_j
              = (1 - m_i) * attention(q_i, K_not_txt, V_not_txt) + m_i * regulate(q_i, K_txt, V_txt)

    so the image->image probabilities and the text's total mass are the model's own, and the targets get
    their share of the query's attention to the text. Equivalently: the bias is added to the target scores
    inside the joint softmax and the text block is scaled back to the mass m_i it had.

    attend(q, k, v): the attention kernel in [batch, heads, tokens, head dim] (softmax(q k^T / sqrt(d)) v).
    q (B, H, M, D): the image queries, M = map_hw[0] * map_hw[1] in row-major token order; k, v (B, H, N, D):
    all the keys and values; groups / keep: positions among the text tokens (0 = the first text token).
    Returns the image queries' output (B, H, M, D), dtype of q, and this step's optimum (as `regulate`).
    """
    b, h, m, d = q.shape
    k_txt, v_txt = k[:, :, txt], v[:, :, txt]

    def flat(t: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, N, H * D], regulate's layout
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    text_out, best = regulate(flat(q), flat(k_txt), flat(v_txt), h, groups, keep, map_hw, step, previous, params,
                              basis=basis, seed=seed)
    text_out = text_out.reshape(b, m, h, v.shape[-1]).transpose(1, 2)
    indicator = torch.zeros_like(v)
    indicator[:, :, txt] = 1
    mass = attend(q, k, indicator)[..., :1]  # m_i, every channel of the output holds it
    rest = torch.cat([k[:, :, :txt.start], k[:, :, txt.stop:]], dim=2)
    if rest.shape[2] == 0:
        return (mass * text_out).to(q.dtype), best
    rest_out = attend(q, rest, torch.cat([v[:, :, :txt.start], v[:, :, txt.stop:]], dim=2))
    return ((1 - mass) * rest_out + mass * text_out).to(q.dtype), best
