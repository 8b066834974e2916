"""Self-attention injection against the official algorithms, written out plainly.

Free-Prompt-Editing (alibaba/EasyNLP diffusion/FreePromptEditing, SelfAttentionControlEdit): the batch is
[uncond source, uncond target, cond source, cond target]; in the conditional half only, for steps
[0, int(N * ratio)) and self-attention maps of at most (latent side / 2)^2 positions (32 x 32 at 512 px),
the target's probabilities are the source's: out_tgt = softmax(Q_src K_src^T / sqrt(d)) V_tgt.

MasaCtrl (TencentARC/MasaCtrl, MutualSelfAttentionControl): from step S and layer L (self-attention layers
counted in execution order), in BOTH halves, the target's queries attend to the source's keys and values of
the same half: out_tgt = softmax(Q_tgt K_src^T / sqrt(d)) V_src; the source attends to itself.
Mask-guided (MutualSelfAttentionControlMask): masks resized to each map by nearest neighbour; the target's
query attends once to the source's foreground keys only (-inf elsewhere) and once to its background keys
only; out_tgt = m_t * out_fg + (1 - m_t) * out_bg with m_t the target's mask.

Everything here is written without the pack's attention/ or engine/ helpers: per-head loops and an explicit
softmax in float64. Two checks on the tiny SD1.x (eps), SD2.x (v) and SDXL models:
- the registered attn1 patch called with host-shaped inputs in float64, chunk by chunk (both halves in one
  call, each alone, in either order; two images with masks of their own): equal to the reference up to
  float64 rounding;
- whole edits of the Edit Sampler against a plain DDIM loop (source pinned to the inversion, guidance
  uncond + cfg * (cond - uncond)) whose self-attention is the reference: the same computation, up to the
  float32 drift of the host's kernels, relative to what the choice under test changes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attention_edit.attention.layout import SOURCE, TARGET, BranchLayout
from attention_edit.engine.contract import RUN_KEY, EditRunContext
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.injection import SelfAttentionInjection
from attention_edit.nodes.inversion import DDIMInversion
from fixtures import tiny

STEPS = 8
CFG = 7.5
LATENT_SIDE = 16
# MasaCtrl's layer 10 of SD1.5's 16 is the first decoder block at half the latent side (32x32 at 512 px); on
# SDXL the equivalent is 64 of 70 (the last of the official SDXL script's 44, 54, 64). At the 16x16 latent
# the tiny SD1.x/SD2.x models run input 1, 3, 5, middle, output 0-5 with maps of 16, 8, 4, 2, 2, 2, 4, 4, 8, 8
# on a side: output 4, block 8. The tiny SDXL runs input 3, 5, 5, middle x2, output 2, 3, 4, 4, 5, 5 with
# 8, 4, 4, 4, 4, 8, 8, 16, 16, 16, 16: output 2, block 5. (test_masactrl_layer_table checks this table.)
MASACTRL_LAYER = {"sd15": 8, "sd2v": 8, "sdxl": 5}


# ---------------------------------------------------------------- the reference, written plainly

def softmax(scores: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def per_head(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """(N, heads * d) -> one (N, d) per head."""
    d = t.shape[-1] // heads
    return [t[:, h * d:(h + 1) * d] for h in range(heads)]


def probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, keys: torch.Tensor | None = None) -> list:
    """softmax(q k^T / sqrt(d)) per head; keys: the keys allowed (others at -inf, as the official masks)."""
    d = q.shape[-1] // heads
    out = []
    for qh, kh in zip(per_head(q, heads), per_head(k, heads)):
        scores = (qh @ kh.T) / math.sqrt(d)
        if keys is not None:
            scores = scores.masked_fill(~keys[None, :], float("-inf"))
        out.append(softmax(scores))
    return out


def apply(probs: list, v: torch.Tensor, heads: int) -> torch.Tensor:
    return torch.cat([p @ vh for p, vh in zip(probs, per_head(v, heads))], dim=-1)


def attention(q, k, v, heads, keys=None):
    return apply(probabilities(q, k, heads, keys), v, heads)


def official_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """MasaCtrl resizes a mask to the layer's square map (nearest neighbour); binary masks given here."""
    side = int(math.isqrt(tokens))
    return F.interpolate(mask[None, None].double(), (side, side)).flatten() >= 0.5


def masked_mutual(q_t, k_s, v_s, heads, source_fg, target_fg):
    fg = attention(q_t, k_s, v_s, heads, keys=source_fg)
    bg = attention(q_t, k_s, v_s, heads, keys=~source_fg)
    m = target_fg.double()[:, None]
    return fg * m + bg * (1 - m)


def reference_rows(mode, q, k, v, heads, halves, images, inject, variant_rows=None, masks=None):
    """The reference output of every row of a call laid out as the edit sampler lays it out: per half
    (chunk), the source's images, then the target's. halves: 'u' or 'c' per chunk; inject: this layer
    and step are injected; variant_rows: None = the official halves, else 'cond' / 'all'."""
    out = torch.empty_like(q)
    per = 2 * images
    which = variant_rows or ("cond" if mode == "fpe" else "all")
    for c, half in enumerate(halves):
        for i in range(images):
            s, t = c * per + i, c * per + images + i
            out[s] = attention(q[s], k[s], v[s], heads)
            changed = inject and (which == "all" or half == "c")
            if not changed:
                out[t] = attention(q[t], k[t], v[t], heads)
            elif mode == "fpe":
                out[t] = apply(probabilities(q[s], k[s], heads), v[t], heads)
            elif masks is None:
                out[t] = attention(q[t], k[s], v[s], heads)
            else:
                source_mask, target_mask = masks
                n = q.shape[1]
                out[t] = masked_mutual(q[t], k[s], v[s], heads, official_mask(source_mask[i % len(source_mask)], n),
                                       official_mask(target_mask[i % len(target_mask)], n))
    return out


def execution_keys(model) -> list[tuple[str, int, int]]:
    """(block name, number, index) of every transformer block, in the order a UNet forward runs them."""
    unet = model.model.diffusion_model
    keys = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                for j in range(len(getattr(layer, "transformer_blocks", []))):
                    keys.append((name, number, j))
    return keys


# ---------------------------------------------------------------- helpers: the pack's node, the host's model

def inject(model, mode, rows="official", mask=None, target_mask=None, ratio=0.8):
    return SelfAttentionInjection.execute(model=model, mode=mode, fpe_ratio=ratio, fpe_max_map_side=0.5,
                                          masactrl_start_step=4, masactrl_start_layer=-1, injection_rows=rows,
                                          masactrl_mask=mask, masactrl_target_mask=target_mask).args[0]


def rectangle(top, left, height, width, size=LATENT_SIDE * 8):
    m = torch.zeros(1, size, size)
    m[:, top:top + height, left:left + width] = 1.0
    return m


SOURCE_MASK = rectangle(24, 16, 64, 72)
TARGET_MASK = rectangle(40, 40, 72, 56)


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request):
    name = request.param
    model = tiny.build(name)
    conds = {k: tiny.conditioning(name, s) for k, s in (("empty", 1), ("src", 2), ("tgt", 3), ("neg", 4))}
    _, handle = DDIMInversion.execute(model=model, latent={"samples": tiny.latent()}, positive=conds["empty"],
                                      negative=None, cfg=1.0, steps=STEPS, scheduler="ddim_uniform",
                                      strength=1.0).args
    return name, model, conds, handle


# ---------------------------------------------------------------- 1. the registered patch, one call at a time

def call_patch(model, key, q, k, v, heads, chunks, images, step):
    """The attn1 replace the node registered on `key`, called as the host calls it inside the Edit Sampler;
    None where it registered none (the host's own attention runs there)."""
    patch = model.model_options["transformer_options"]["patches_replace"]["attn1"].get(key)
    if patch is None:
        return None
    schedule = torch.linspace(14.6, 0.0, STEPS + 1)
    run = EditRunContext(BranchLayout((SOURCE, TARGET), images), schedule)
    extra = {"n_heads": heads, "dim_head": q.shape[-1] // heads, "block": key[:2], "block_index": key[2],
             "original_shape": [q.shape[0], 4, LATENT_SIDE, LATENT_SIDE], "cond_or_uncond": list(chunks),
             "sigmas": schedule[step:step + 1], RUN_KEY: run}
    return patch(q, k, v, extra)


_TOKENS: dict = {}


def tokens_of(name, model, key) -> int:
    """Positions of the block's self-attention map at the 16x16 latent (from the host's own forward)."""
    if (name, key) in _TOKENS:
        return _TOKENS[(name, key)]
    seen = {}

    def record(q, k, v, extra_options):
        seen[(extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])] = q.shape[1]
        return attention(q[0].double(), k[0].double(), v[0].double(), extra_options["n_heads"])[None].to(q).expand_as(q)

    m = model.clone()
    for kk in execution_keys(model):
        m.set_model_attn1_replace(record, *kk)
    x = torch.zeros(1, 4, LATENT_SIDE, LATENT_SIDE)
    context = torch.zeros(1, 77, tiny.CONTEXT_DIM[name])
    kwargs = {}
    if name == "sdxl":
        kwargs["y"] = torch.zeros(1, model.model.adm_channels)
    with torch.no_grad():
        m.model.apply_model(x, torch.tensor([1.0]), c_crossattn=context,
                            transformer_options=m.model_options["transformer_options"], **kwargs)
    _TOKENS.update({(name, k): n for k, n in seen.items()})
    return seen[key]


CHUNKINGS = {"one call, cond first": [(0, 1)], "one call, uncond first": [(1, 0)],
             "cond and uncond in separate calls": [(1,), (0,)]}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("mode", ["fpe", "masactrl", "masactrl masked"])
def test_patch_equals_the_official_rows_for_every_chunking(family, mode, chunking):
    name, model, *_ = family
    images = 2
    masks = None
    kind = mode.split()[0]
    if mode == "masactrl masked":  # one mask per image, a target mask of its own
        masks = (torch.cat([SOURCE_MASK, TARGET_MASK]), torch.cat([TARGET_MASK, rectangle(0, 0, 64, 128)]))
    patched = inject(model, kind, mask=None if masks is None else masks[0], target_mask=None if masks is None else masks[1])
    keys = execution_keys(model)
    layer = MASACTRL_LAYER[name]
    g = torch.Generator().manual_seed(3)
    # Blocks inside and outside each method's layers, steps inside and outside its window.
    for key in (keys[0], keys[layer - 1], keys[layer], keys[-1]):
        tokens = tokens_of(name, model, key)
        block = model.model.diffusion_model
        heads = next(t for t in _transformers(block, key)).attn1.heads
        channels = next(t for t in _transformers(block, key)).attn1.to_q.out_features
        for step in (3, 4, 5, 6, 7):
            fpe_on = step < int(STEPS * 0.8) and tokens <= (LATENT_SIDE // 2) ** 2
            masactrl_on = step >= 4 and keys.index(key) >= layer
            on = fpe_on if kind == "fpe" else masactrl_on
            for chunks in CHUNKINGS[chunking]:
                batch = 2 * images * len(chunks)
                q, k, v = (torch.randn(batch, tokens, channels, generator=g, dtype=torch.float64) for _ in range(3))
                out = call_patch(patched, key, q, k, v, heads, chunks, images, step)
                if out is None:
                    assert not on, f"{name} {mode}: no patch on {key}, which the official code changes"
                    continue
                halves = ["c" if c == 0 else "u" for c in chunks]
                expected = reference_rows(kind, q, k, v, heads, halves, images, on, masks=masks)
                err = float((out - expected).abs().max())
                assert err <= 1e-10, f"{name} {mode} {key} step {step} chunks {chunks}: differs by {err}"


def _transformers(unet, key):
    name, number, j = key
    block = {"input": unet.input_blocks, "output": unet.output_blocks}.get(name)
    block = unet.middle_block if block is None else block[number]
    for layer in block:
        if hasattr(layer, "transformer_blocks"):
            yield layer.transformer_blocks[j]


def test_masactrl_layer_table(family):
    name, model, *_ = family
    keys = execution_keys(model)
    half = (LATENT_SIDE // 2) ** 2
    first = next(i for i, k in enumerate(keys) if k[0] == "output" and tokens_of(name, model, k) == half)
    assert MASACTRL_LAYER[name] == first


def test_the_old_all_rows_fpe_and_cond_only_masactrl_are_named_options(family):
    name, model, *_ = family
    # A block in both methods' layers: a decoder block of MasaCtrl's with a map of at most half the side.
    key = next(k for k in execution_keys(model)[MASACTRL_LAYER[name]:]
               if tokens_of(name, model, k) <= (LATENT_SIDE // 2) ** 2)
    tokens = tokens_of(name, model, key)
    t = next(_transformers(model.model.diffusion_model, key)).attn1
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, tokens, t.to_q.out_features, generator=g, dtype=torch.float64) for _ in range(3))
    for mode, rows, which in (("fpe", "cond_and_uncond", "all"), ("fpe", "cond", "cond"),
                              ("masactrl", "cond", "cond"), ("masactrl", "cond_and_uncond", "all")):
        out = call_patch(inject(model, mode, rows=rows), key, q, k, v, t.heads, (0, 1), 1, 5)
        expected = reference_rows(mode, q, k, v, t.heads, ["c", "u"], 1, True, variant_rows=which)
        assert float((out - expected).abs().max()) <= 1e-10, f"{name} {mode} {rows}"


# ---------------------------------------------------------------- 2. whole edits against a plain DDIM loop

def reference_edit(name, model, handle, source, target, negative, mode=None, variant_rows=None, masks=None):
    """The official loop: batch [uncond src, uncond tgt, cond src, cond tgt], source pinned to the inversion,
    guided x0 = uncond + cfg (cond - uncond), DDIM (eta 0) = Euler in sigma space; the reference attention
    in every self-attention layer. Returns the target latent in VAE space."""
    keys = execution_keys(model)
    state = {"step": 0}

    def reference_patch(key):
        index = keys.index(key)

        def patch(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            i = state["step"]
            if mode == "fpe":
                on = i < int(STEPS * 0.8) and k.shape[1] <= (LATENT_SIDE // 2) ** 2
            elif mode == "masactrl":
                on = i >= 4 and index >= MASACTRL_LAYER[name]
            else:
                on = False
            out = reference_rows(mode or "fpe", q.double(), k.double(), v.double(), heads, ["u", "c"], 1, on,
                                 variant_rows=variant_rows, masks=masks)
            return out.to(q.dtype)
        return patch

    options = {"patches_replace": {"attn1": {key: reference_patch(key) for key in keys}}}
    prompts = [negative, negative, source, target]
    context = torch.cat([c[0][0] for c in prompts])
    extra = {}
    if name == "sdxl":
        side = LATENT_SIDE * 8
        extra["y"] = torch.cat([model.model.encode_adm(pooled_output=c[0][1]["pooled_output"], width=side, height=side)
                                for c in prompts])
    sigmas, trajectory = handle.sigmas, handle.latents
    x_target = trajectory[0].clone()
    with torch.no_grad():
        for i in range(STEPS):
            state["step"] = i
            x_source = trajectory[i]
            sigma = float(sigmas[i])
            x = torch.cat([x_source, x_target, x_source, x_target])
            denoised = model.model.apply_model(x, torch.full((4,), sigma), c_crossattn=context,
                                               transformer_options=options, **extra)
            uncond, cond = denoised[:2], denoised[2:]
            guided = uncond + CFG * (cond - uncond)
            x_target = x_target + (float(sigmas[i + 1]) - sigma) * (x_target - guided[1:2]) / sigma
    sampling = model.get_model_object("model_sampling")
    return model.model.process_latent_out(sampling.inverse_noise_scaling(sigmas[-1], x_target))


def pack_edit(model, handle, source, target, negative):
    out = EditSampler.execute(model=model, source=source, target=target, negative=negative, cfg=CFG, steps=STEPS,
                              scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle).args
    return out[0]["samples"]


PROMPTS = {"source recomputed (its own prompt and negative)": ("src", "tgt", "neg"),
           "source replayed (the inversion's empty prompt)": ("empty", "tgt", "empty")}


@pytest.mark.parametrize("prompts", list(PROMPTS))
def test_edits_equal_a_plain_loop_with_the_official_attention(family, prompts):
    name, model, conds, handle = family
    source, target, negative = (conds[p] for p in PROMPTS[prompts])
    plain = reference_edit(name, model, handle, source, target, negative)
    # The loop itself: without injection it is the pack's plain edit.
    tiny.assert_same_computation(pack_edit(model, handle, source, target, negative), plain,
                                 effect=reference_edit(name, model, handle, source, target, negative, mode="fpe") - plain)
    cases = [  # (the pack's node settings, the reference, the variant that the setting must not be)
        (dict(mode="fpe"), dict(mode="fpe"), dict(mode="fpe", variant_rows="all")),
        (dict(mode="fpe", rows="cond_and_uncond"), dict(mode="fpe", variant_rows="all"), dict(mode="fpe")),
        (dict(mode="masactrl"), dict(mode="masactrl"), dict(mode="masactrl", variant_rows="cond")),
        (dict(mode="masactrl", mask=SOURCE_MASK), dict(mode="masactrl", masks=(SOURCE_MASK, SOURCE_MASK)),
         dict(mode="masactrl")),
        (dict(mode="masactrl", mask=SOURCE_MASK, target_mask=TARGET_MASK),
         dict(mode="masactrl", masks=(SOURCE_MASK, TARGET_MASK)), dict(mode="masactrl", masks=(SOURCE_MASK, SOURCE_MASK))),
    ]
    for settings, official, other in cases:
        expected = reference_edit(name, model, handle, source, target, negative, **official)
        variant = reference_edit(name, model, handle, source, target, negative, **other)
        edited = pack_edit(inject(model, **settings), handle, source, target, negative)
        try:
            tiny.assert_same_computation(edited, expected, effect=variant - expected)
        except AssertionError as e:
            raise AssertionError(f"{name} {settings}: {e}") from None
