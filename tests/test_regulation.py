"""Attention regulation (arXiv 2403.06381): the objective on synthetic attention, the patch's gating,
the word lookup through real CLIP tokenizers, and stock-sampler runs on the three tiny families."""

import math

import nodes as comfy_nodes
import pytest
import torch

from attention_edit.attention import regulation as R
from attention_edit.attention.blocks import map_size
from attention_edit.attention.heads import head_scores, heads_output
from attention_edit.engine import regulation as E
from attention_edit.engine.patching import block_map_sides, default_attention, transformer_blocks
from attention_edit.nodes.regulation import AttentionRegulation
from fixtures import tiny

STEPS = 6


class TokenizerOnlyClip:
    """What the node uses of a CLIP: tokenize(), with a stock ComfyUI tokenizer (the real CLIP BPE)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


def clip_for(family: str) -> TokenizerOnlyClip:
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.text_encoders import sd2_clip

    make = {"sd15": comfy.sd1_clip.SD1Tokenizer, "sd2v": sd2_clip.SD2Tokenizer, "sdxl": comfy.sdxl_clip.SDXLTokenizer}
    return TokenizerOnlyClip(make[family]())


@pytest.fixture(scope="module")
def sd1_clip():
    return clip_for("sd15")


def synthetic_qkv(side=16, heads=2, offsets=None, seed=0, tokens=77):
    """q, k, v (1 row) whose scores are random plus a per-token offset (a constant query feature read by
    the keys), and v one-hot per token and head, so the output *is* the attention probabilities."""
    offsets = offsets or {0: 3.0, 5: 1.0, 8: -1.0}  # start token strong, token 5 fine, token 8 neglected
    g = torch.Generator().manual_seed(seed)
    d = tokens + 3
    m = side * side
    q = torch.randn(1, m, heads, d, generator=g) * 0.5
    k = torch.randn(1, tokens, heads, d, generator=g) * 0.5
    q[..., -1] = 1.0
    k[..., -1] = 0.0
    for t, off in offsets.items():
        k[0, t, :, -1] = off * math.sqrt(d)  # scores are scaled by d ** -0.5
    v = torch.zeros(1, tokens, heads, d)
    for t in range(tokens):
        v[0, t, :, t] = 1.0
    return q.reshape(1, m, heads * d), k.reshape(1, tokens, heads * d), v.reshape(1, tokens, heads * d)


def probs_of(out, heads, tokens=77):
    b, m, inner = out.shape
    return out.reshape(b, m, heads, inner // heads)[..., :tokens].float()


# --- the pure math ------------------------------------------------------------------------------


def test_gaussian_basis_follows_the_official_code():
    basis = R.gaussian_basis(16, 16)
    assert basis.shape == (49, 256)  # sigma = 16 // 16 = 1, centres 2, 4, ..., 14 on both axes
    peak = basis[0].reshape(16, 16)
    assert peak[2, 2] == 1.0 and torch.isclose(peak[2, 3], torch.tensor(math.exp(-0.5)))
    assert R.gaussian_basis(32, 32).shape == (49, 1024)  # sigma 2, centres 4, 8, ..., 28
    # sigma = width // 16 as in the official code: at 24x24 (SD2 at 768 px) sigma 1, centres 2, ..., 22.
    assert R.bump_sigma(24) == 1.0 and R.gaussian_basis(24, 24).shape == (11 * 11, 576)
    assert R.bump_sigma(48) == 3.0 and R.gaussian_basis(48, 48).shape == (49, 48 * 48)
    # Below 16 (the official code divides by zero there) sigma = width / 16.
    assert R.bump_sigma(8) == 0.5 and R.gaussian_basis(8, 8).shape == (49, 64)
    assert R.gaussian_basis(8, 16).shape == (3 * 7, 128)  # sigma from the width, centres inside each axis
    assert map_size(256, 64, 64) == (16, 16) and map_size(8 * 12, 60, 90) == (8, 12) and map_size(7, 8, 8) is None


def test_initial_weights_are_seeded_uniform_and_the_seed_names_layer_and_step():
    w = R.initial_weights(4, 2, 49, seed=123)
    assert w.shape == (4, 2, 49) and w.dtype == torch.float32 and (w >= 0).all() and (w < 1).all()
    torch.testing.assert_close(w, torch.rand(4, 2, 49, generator=torch.Generator().manual_seed(123)), rtol=0, atol=0)
    assert torch.equal(w, R.initial_weights(4, 2, 49, seed=123))
    assert not torch.equal(w, R.initial_weights(4, 2, 49, seed=124))
    assert R.layer_seed(("input", 7, 0), 3) == 107000003 and R.layer_seed(("output", 3, 1), 0) == 303010000
    seeds = {R.layer_seed((name, n, i), step) for name in ("input", "middle", "output") for n in range(12)
             for i in range(10) for step in range(50)}
    assert len(seeds) == 3 * 12 * 10 * 50


def test_upper_quantile_equals_torch_quantile():
    x = torch.rand(3, 2, 256)
    for q in (0.5, 0.9, 0.99, 1.0):
        torch.testing.assert_close(R.upper_quantile(x, q), torch.quantile(x, q, dim=-1))
    x = torch.rand(4, 16, requires_grad=True)
    (g1,) = torch.autograd.grad(R.upper_quantile(x, 0.9).sum(), x)
    (g2,) = torch.autograd.grad(torch.quantile(x, 0.9, dim=-1).sum(), x)
    torch.testing.assert_close(g1, g2)


def test_neglected_target_gets_a_high_attention_region_and_an_equal_share():
    heads = 2
    q, k, _ = synthetic_qkv(heads=heads)
    scores = head_scores(q, k, heads)
    groups = [torch.tensor([5]), torch.tensor([8])]
    rest, grouped = R.group_logits(scores, groups)
    before = R.target_maps(rest, grouped, torch.zeros_like(grouped))
    start = R.initial_weights(scores.shape[0], 2, 49, seed=0)
    bias = R.optimise_bias(scores, groups, R.gaussian_basis(16, 16), R.RegulationParams(), start)
    after = R.target_maps(rest, grouped, bias)
    q90_before, q90_after = R.upper_quantile(before, 0.9), R.upper_quantile(after, 0.9)
    # The neglected token (8) had almost no attention anywhere; now a region of it is high, toward 0.9.
    assert (q90_before[:, 1] < 0.02).all() and (q90_after[:, 1] > 0.6).all()
    assert (q90_after > q90_before).all() and (q90_after <= 0.95).all()
    # Its share of the attention was a fraction of the other target's; now both are close to 0.2 (20
    # steps from a random start, as in the official code, leave them within about a quarter of each other).
    share_before, share_after = before.mean(-1), after.mean(-1)
    assert (share_before[:, 1] < 0.3 * share_before[:, 0]).all()
    assert (share_after.min(-1).values > 0.7 * share_after.max(-1).values).all()
    assert ((share_after - 0.2).abs() < 0.06).all()
    params = R.RegulationParams()
    w0 = torch.zeros(scores.shape[0], 2, 49)
    assert (R.objective(after, w0, params) < 0.5 * R.objective(before, w0, params)).all()
    # The bias is smooth: a sum of bumps of width 1 pixel at 16x16, so neighbours differ by little.
    maps = bias.reshape(-1, 2, 16, 16)
    assert (maps[..., 1:, :] - maps[..., :-1, :]).abs().max() < 0.5 * maps.abs().max()


def test_objective_weights_and_share_target():
    assert R.share_target(1) == pytest.approx(0.2) and R.share_target(2) == pytest.approx(0.2)
    assert R.share_target(5) == pytest.approx(0.2) and R.share_target(8) == pytest.approx(1 / 8)
    maps = torch.full((1, 2, 100), 0.2)
    maps[:, :, 90:] = 0.9  # the 0.9-quantile is 0.2 + 0.1 * (0.9 - 0.2) at position 89.1
    w = torch.ones(1, 2, 49)
    p = R.RegulationParams()
    q90 = 0.2 + 0.1 * 0.7
    share = (0.2 * 90 + 0.9 * 10) / 100 - 0.2
    expected = (q90 - 0.9) ** 2 + 80 * share**2 + 0.09 * 1.0
    assert R.objective(maps, w, p).item() == pytest.approx(expected, rel=1e-5)


def test_best_iterate_is_chosen_over_all_rows_and_heads_together():
    """The official code keeps the iterate of lowest batch-mean loss (one choice for every row and head),
    scoring the iterates before each of the `iterations` steps."""
    heads, params = 2, R.RegulationParams(iterations=12)
    q1, k1, _ = synthetic_qkv(heads=heads)
    q2, k2, _ = synthetic_qkv(heads=heads, seed=3, offsets={0: 2.0, 5: -2.0, 8: 0.5})
    scores = head_scores(torch.cat([q1, q2]), torch.cat([k1, k2]), heads)
    groups, basis = [torch.tensor([5]), torch.tensor([8])], R.gaussian_basis(16, 16)
    rest, grouped = R.group_logits(scores, groups)
    w = R.initial_weights(scores.shape[0], 2, 49, seed=5)
    iterates, losses = [], []
    for _ in range(params.iterations):
        w.requires_grad_(True)
        bias = torch.mm(w.reshape(-1, 49), basis).reshape(grouped.shape)
        loss = R.objective(R.target_maps(rest, grouped, bias), w, params)
        iterates.append(bias.detach())
        losses.append(loss.detach())
        (grad,) = torch.autograd.grad(loss.sum(), w)
        w = (w.detach() - params.learning_rate * grad)
    losses = torch.stack(losses)  # (iterations, rows)
    best = R.optimise_bias(scores, groups, basis, params, R.initial_weights(scores.shape[0], 2, 49, seed=5))
    torch.testing.assert_close(best, iterates[int(losses.sum(1).argmin())])
    # Here the rows alone would pick other iterates: the choice is the call's, not each row's.
    assert len(set(losses.argmin(0).tolist()) | {int(losses.sum(1).argmin())}) > 1


def restore_case():
    """Scores of 4 rows x 64 queries x 77 tokens, two targets (one of two tokens), a bias, start and end."""
    torch.manual_seed(1)
    return torch.randn(4, 64, 77) * 2, [torch.tensor([5]), torch.tensor([8, 9])], torch.randn(4, 2, 64) * 3, \
        torch.tensor([0, 12])


def test_start_end_overwritten_without_renormalising():
    scores, groups, bias, keep = restore_case()
    p0 = scores.softmax(-1)
    full = scores.clone()
    full[..., 5] += bias[:, 0]
    full[..., 8] += bias[:, 1]
    full[..., 9] += bias[:, 1]
    biased = full.softmax(-1)
    p = R.regulated_probs(scores, groups, bias, keep)  # the official restore
    torch.testing.assert_close(p[..., keep], p0[..., keep])
    rest = torch.tensor([t for t in range(77) if t not in (0, 12)])
    torch.testing.assert_close(p[..., rest], biased[..., rest])  # the targets keep their regulated probability
    assert (p.sum(-1) - 1).abs().max() > 0.05  # so the rows no longer sum to one
    # No keep: the plain biased softmax.
    torch.testing.assert_close(R.regulated_probs(scores, groups, bias, None), biased)
    with pytest.raises(ValueError, match="restore"):
        R.regulated_probs(scores, groups, bias, keep, "bogus")
    with pytest.raises(ValueError, match="restore"):
        R.RegulationParams(restore="bogus").validate()


def test_restore_renormalise_keeps_rows_normalised_and_non_target_order():
    scores, groups, bias, keep = restore_case()
    p0 = scores.softmax(-1)
    p = R.regulated_probs(scores, groups, bias, keep, "renormalise")
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 64))
    torch.testing.assert_close(p[..., keep], p0[..., keep])
    others = torch.tensor([t for t in range(77) if t not in (0, 12, 5, 8, 9)])
    # Every non-target token is scaled by one factor per position: same ratios, same order.
    ratio = p[..., others] / p0[..., others]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    assert torch.equal(p[..., others].argsort(-1), p0[..., others].argsort(-1))
    # Tokens of one target move together by the target's bias.
    torch.testing.assert_close(p[..., 8] / p[..., 9], p0[..., 8] / p0[..., 9])


def test_regulate_outputs_the_regulated_attention_and_smooths_over_steps():
    heads = 2
    q, k, v = synthetic_qkv(heads=heads)
    params = R.RegulationParams()
    groups, keep = [[5], [8]], [0, 10]
    scores = head_scores(q, k, heads)
    basis = R.gaussian_basis(16, 16)
    tgroups = [torch.tensor(g) for g in groups]
    start = R.initial_weights(scores.shape[0], 2, 49, seed=7)
    best = R.optimise_bias(scores, tgroups, basis, params, start)
    out, s0 = R.regulate(q, k, v, heads, groups, keep, (16, 16), step=0, params=params, seed=7)
    # What is passed on is this step's optimum, not the smoothed bias.
    torch.testing.assert_close(s0, best)
    # Step 0: the moving average mixes the optimum with the bias of the initial weights.
    initial = torch.mm(start.reshape(-1, 49), basis).reshape(best.shape)
    probs0 = R.regulated_probs(scores, tgroups, 0.25 * initial + 0.75 * best, torch.tensor(keep))
    torch.testing.assert_close(out, heads_output(probs0, v, heads))
    p = probs_of(out, heads)
    p0 = scores.softmax(-1).reshape(1, heads, 256, 77).transpose(1, 2)
    assert (p[..., 8].mean() > 5 * p0[..., 8].mean())  # the neglected target is attended to now
    torch.testing.assert_close(p[..., keep], p0[..., keep])
    # Step 3 with the previous step's optimum: EMA 0.25 against it, scaled by 0.99 ** 3.
    previous = s0 * 2
    out3, s3 = R.regulate(q, k, v, heads, groups, keep, (16, 16), step=3, previous=previous, params=params, seed=7)
    torch.testing.assert_close(s3, best)  # not 0.25 * previous + 0.75 * best
    probs3 = R.regulated_probs(scores, tgroups, (0.25 * previous + 0.75 * best) * 0.99**3, torch.tensor(keep))
    torch.testing.assert_close(out3, heads_output(probs3, v, heads))
    # The seed decides the start: another seed, another result; the same seed, the same one.
    again, _ = R.regulate(q, k, v, heads, groups, keep, (16, 16), step=0, params=params, seed=7)
    other, _ = R.regulate(q, k, v, heads, groups, keep, (16, 16), step=0, params=params, seed=8)
    assert torch.equal(again, out) and (other - out).abs().max() > 1e-4
    # The renormalise variant: the same bias, the other restore.
    renorm = R.RegulationParams(restore="renormalise")
    out_r, _ = R.regulate(q, k, v, heads, groups, keep, (16, 16), step=0, params=renorm, seed=7)
    probs_r = R.regulated_probs(scores, tgroups, 0.25 * initial + 0.75 * best, torch.tensor(keep), "renormalise")
    torch.testing.assert_close(out_r, heads_output(probs_r, v, heads))
    # No iterations: no bias, the plain attention.
    out_none, _ = R.regulate(q, k, v, heads, groups, keep, (16, 16), step=0, params=R.RegulationParams(iterations=0))
    torch.testing.assert_close(out_none, heads_output(scores.softmax(-1), v, heads))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_nan_in_half_precision(dtype):
    """Everything runs in float32: a half-precision call gives the float32 computation on the same
    (rounded) inputs, up to the output's rounding."""
    heads = 2
    q, k, v = synthetic_qkv(heads=heads, offsets={0: 8.0, 5: 4.0, 8: -6.0})
    for scale in (1.0, 30.0):  # 30: scores of several hundred, far beyond what half-precision softmax can take
        args = ((q * scale).to(dtype), (k * scale).to(dtype), v.to(dtype))
        out, bias = R.regulate(*args, heads, [[5], [8]], [0, 10], (16, 16), step=0)
        assert out.dtype == dtype and bias.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(bias).all()
        ref, ref_bias = R.regulate(*(a.float() for a in args), heads, [[5], [8]], [0, 10], (16, 16), step=0)
        torch.testing.assert_close(bias, ref_bias)
        eps = torch.finfo(dtype).eps
        assert ((out.float() - ref).abs() <= eps * ref.abs().clamp_min(1e-3)).all()


def test_regulate_runs_under_inference_mode_like_the_host():
    heads = 2
    q, k, v = synthetic_qkv(heads=heads, side=8)
    with torch.inference_mode():
        out, bias = R.regulate(q, k, v, heads, [[5], [8]], [0, 10], (8, 8), step=1, previous=None)
    plain, _ = R.regulate(q, k, v, heads, [[5], [8]], [0, 10], (8, 8), step=1)
    torch.testing.assert_close(out, plain)


# --- word lookup ------------------------------------------------------------------------------------


def test_multi_token_word_is_one_target_with_all_its_tokens(sd1_clip):
    plan = E.find_target_tokens(sd1_clip, "a photo of a cat and a bioluminescent jellyfish", "cat, bioluminescent")
    assert plan.words == ("cat", "bioluminescent")
    assert plan.groups == (((0, 5),), tuple((0, i) for i in range(8, 13)))  # bi olu min esc ent
    assert plan.keep == ((0, 0), (0, 14)) and plan.chunks == 1
    # Phrases, case, weights syntax and repeated words.
    plan = E.find_target_tokens(sd1_clip, "A (red car:1.2) next to a red car and a Dog", "red car, dog")
    assert plan.groups[0] == ((0, 2), (0, 3), (0, 7), (0, 8)) and plan.groups[1] == ((0, 11),)
    assert E.find_target_tokens(sd1_clip, "a cat", "  ,  ") is None


def test_missing_word_is_a_clear_error_listing_the_prompt_words(sd1_clip):
    with pytest.raises(ValueError, match=r"'dog' not found in the prompt.*words: a, photo, of, a, cat, and, a, "
                                         r"bioluminescent, jellyfish"):
        E.find_target_tokens(sd1_clip, "a photo of a cat and a bioluminescent jellyfish", "cat, dog")
    with pytest.raises(ValueError, match="share tokens"):
        E.find_target_tokens(sd1_clip, "a red car", "red car, car")
    with pytest.raises(ValueError, match="prompt is empty"):
        E.find_target_tokens(sd1_clip, "  ", "car")


def test_both_sdxl_tokenizers_see_the_same_positions():
    prompt = "a watercolor of a bioluminescent jellyfish beside a lighthouse"
    tokens = clip_for("sdxl").tokenize(prompt)
    assert set(tokens) == {"g", "l"}
    assert [t for t, _ in tokens["g"][0][:12]] == [t for t, _ in tokens["l"][0][:12]]
    assert tokens["g"][0][-1][0] != tokens["l"][0][-1][0]  # they pad differently, which does not matter
    sdxl = E.find_target_tokens(clip_for("sdxl"), prompt, "jellyfish, lighthouse")
    assert sdxl == E.find_target_tokens(clip_for("sd15"), prompt, "jellyfish, lighthouse")
    assert sdxl == E.find_target_tokens(clip_for("sd2v"), prompt, "jellyfish, lighthouse")


def test_long_prompts_every_chunk_and_every_repeat(sd1_clip):
    prompt = "a photo, " * 40 + "a cat on a mat"
    plan = E.find_target_tokens(sd1_clip, prompt, "cat, photo")
    assert plan.chunks == 2
    cat = plan.groups[0]
    assert len(cat) == 1 and cat[0][0] == 1
    groups, keep = plan.context_positions(2 * 77)
    assert groups[0] == [77 + cat[0][1]] and len(groups[1]) == 40
    # Repeated to a common length with another prompt's context (the host repeats the sequence).
    groups3, keep3 = plan.context_positions(4 * 77)
    assert groups3[0] == [77 + cat[0][1], 3 * 77 + cat[0][1]] and len(groups3[1]) == 80
    assert {0, 77, 154, 231} <= set(keep3) and len(keep3) == 8
    with pytest.raises(ValueError, match="not a multiple of 77"):
        plan.context_positions(100)


# --- the patch --------------------------------------------------------------------------------------


def patched(model, plan=None, end=0.5, **kw):
    plan = plan or E.TokenPlan.from_positions([[2], [5]], end=7)
    return E.apply_attention_regulation(model, plan, end, **kw)


def call_patch(m, key, q, k, v, step, steps=10, cond_or_uncond=(1, 0), side=4, sigmas=None):
    patch = m.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    sigmas = torch.linspace(10, 0, steps + 1) if sigmas is None else sigmas
    extra = {"n_heads": 2, "dim_head": q.shape[-1] // 2, "cond_or_uncond": list(cond_or_uncond),
             "sample_sigmas": sigmas, "sigmas": sigmas[step:step + 1].repeat(q.shape[0]),
             "original_shape": [q.shape[0], 4, side * 4, side * 4], "block": key[:2], "block_index": key[2]}
    return patch(q, k, v, extra)


def test_only_conditional_rows_and_steps_in_the_window_change():
    model = tiny.build("sd15")
    m = patched(model, E.TokenPlan.from_positions([[5], [8]], end=10))
    key = E.regulation_layers(model)[0]
    q1, k1, v1 = synthetic_qkv(side=4, heads=2)
    q2, k2, v2 = synthetic_qkv(side=4, heads=2, seed=1)
    q, k, v = torch.cat([q1, q2]), torch.cat([k1, k2]), torch.cat([v1, v2])
    extra = {"n_heads": 2}
    plain = default_attention(q, k, v, extra)
    out = call_patch(m, key, q, k, v, step=0)  # row 0 uncond, row 1 cond
    assert torch.equal(out[0], plain[0])
    assert (out[1] - plain[1]).abs().max() > 1e-2
    out = call_patch(m, key, q, k, v, step=0, cond_or_uncond=(0, 1))
    assert torch.equal(out[1], plain[1]) and (out[0] - plain[0]).abs().max() > 1e-2
    # From step 5 of 10 (end_percent 0.5) on, and in an uncond-only call, nothing changes.
    for step in (5, 9):
        assert torch.equal(call_patch(m, key, q, k, v, step=step), plain)
    assert torch.equal(call_patch(m, key, q, k, v, step=0, cond_or_uncond=(1, 1)), plain)
    # Outside sampling (no schedule) the patch is inert.
    patch = m.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    assert torch.equal(patch(q, k, v, {"n_heads": 2}), plain)


def test_run_state_smooths_against_the_previous_step_and_resets_per_run():
    state = E._RunState()
    assert state.previous("a", 0) is None
    state.store("a", 0, torch.tensor(1.0))
    assert state.previous("a", 1) == 1.0
    state.store("a", 1, torch.tensor(2.0))
    assert state.previous("a", 1) == 1.0  # a second call in the same step still sees step 0
    state.store("a", 1, torch.tensor(3.0))
    assert state.previous("a", 2) == 3.0
    state.reset()  # what the OUTER_SAMPLE wrapper does when a sampling run starts
    assert state.previous("a", 0) is None


def unet_structure(family: str):
    """A model-like object holding the family's UNet built on the meta device (no weights, instant)."""
    import types

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = tiny._unet_config(family)
    config.pop("image_size", None)
    unet = UNetModel(image_size=32, **config, num_head_channels=64, device="meta",
                     operations=comfy.ops.disable_weight_init)
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))


def test_layers_by_meaning():
    for family in tiny.FAMILIES:
        model = tiny.build(family)
        sides = block_map_sides(model)
        chosen = E.regulation_layers(model)
        assert chosen and all(sides[key] == 0.25 and key[0] in ("input", "output") for key in chosen)
        assert set(E.regulation_layers(model, "all", 0.0)) == set(transformer_blocks(model))
        with pytest.raises(ValueError, match="1/16 of the latent side.*1, 1/2, 1/4"):
            E.regulation_layers(model, "all", 1 / 16)
    # The full SD1.5 UNet (structure only): the paper's last down and first up block (16x16 at 512 px).
    assert E.regulation_layers(unet_structure("sd15_full")) == [("input", 7, 0), ("input", 8, 0), ("output", 3, 0),
                                                                ("output", 4, 0), ("output", 5, 0)]


# --- stock samplers on the three families -----------------------------------------------------------


def ksample(model, positive, negative, steps=STEPS, seed=0, size=16, cfg=7.5):
    latent = {"samples": torch.zeros(1, 4, size, size)}
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def regulation_node(model, clip, prompt, words, **kw):
    args = dict(end_percent=0.5, iterations=20, learning_rate=100.0, ema=0.25, decay=0.99, peak_target=0.9,
                share_weight=80.0, beta=0.09, blocks="input, output", map_side=0.25)
    args.update(kw)
    return AttentionRegulation.execute(model=model, clip=clip, prompt=prompt, target_words=words, **args).args[0]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def world(request):
    family = request.param
    model = tiny.build(family)
    positive, negative = tiny.conditioning(family, 2), tiny.conditioning(family, 1)
    return family, model, clip_for(family), positive, negative, ksample(model, positive, negative)


def test_node_in_a_stock_ksampler_on_every_family(world):
    family, model, clip, positive, negative, plain = world
    prompt = "a photo of a cat and a dog"
    regulated = regulation_node(model, clip, prompt, "cat, dog")
    out = ksample(regulated, positive, negative)
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3
    # A second run starts from fresh state: the same result.
    assert torch.equal(ksample(regulated, positive, negative), out)
    # The renormalise restore is another computation (the official overwrite is the default).
    renormalised = ksample(regulation_node(model, clip, prompt, "cat, dog", restore="renormalise"), positive, negative)
    assert torch.isfinite(renormalised).all() and (renormalised - out).abs().max() > 1e-4
    assert torch.equal(ksample(regulation_node(model, clip, prompt, "cat, dog", restore="overwrite"), positive,
                               negative), out)
    # No target words: the model itself, the same output.
    assert regulation_node(model, clip, prompt, "") is model
    # A window covering no step leaves sampling as it was; cfg 1 (no uncond rows) works too.
    none = regulation_node(model, clip, prompt, "cat, dog", end_percent=0.0)
    assert torch.equal(ksample(none, positive, negative), plain)
    assert torch.isfinite(ksample(regulated, positive, negative, cfg=1.0)).all()


def test_structural_map_sides_match_the_maps_seen_while_sampling(world):
    family, model, _, positive, negative, _ = world
    seen = {}
    m = model.clone()
    for key in transformer_blocks(model):
        def probe(q, k, v, extra, key=key):
            shape = extra["original_shape"]
            seen[key] = map_size(q.shape[1], shape[-2], shape[-1])[0] / shape[-2]
            return default_attention(q, k, v, extra)
        m.set_model_attn2_replace(probe, *key)
    ksample(m, positive, negative, steps=1)
    assert seen == block_map_sides(model)


def test_node_errors_before_sampling(sd1_clip):
    model = tiny.build("sd15")
    with pytest.raises(ValueError, match="'horse' not found"):
        regulation_node(model, sd1_clip, "a cat and a dog", "cat, horse")
    with pytest.raises(ValueError, match="no cross-attention layer"):
        regulation_node(model, sd1_clip, "a cat and a dog", "cat", blocks="middle")
    numbers = dict(end_percent=0.5, learning_rate=1.0, ema=0.5, decay=0.5, peak_target=0.5, share_weight=1.0,
                   beta=0.1, map_side=0.25)
    assert "unknown block" in AttentionRegulation.validate_inputs(blocks="bogus", **numbers)
    assert AttentionRegulation.validate_inputs(blocks="input, output", **numbers) is True
    assert AttentionRegulation.validate_inputs(blocks="input, output", restore="renormalise", **numbers) is True
    assert "restore" in AttentionRegulation.validate_inputs(blocks="input, output", restore="bogus", **numbers)


def test_long_prompt_context_against_a_short_negative(sd1_clip):
    """A two-chunk positive prompt against a one-chunk negative: the host repeats the negative's tokens,
    the positive's targets sit in its second chunk."""
    prompt = "a photo, " * 40 + "a cat and a dog"
    model = tiny.build("sd15")
    regulated = regulation_node(model, sd1_clip, prompt, "cat, dog")
    positive = tiny.conditioning("sd15", 2, tokens=154)
    negative = tiny.conditioning("sd15", 1)
    out = ksample(regulated, positive, negative)
    assert torch.isfinite(out).all() and (out - ksample(model, positive, negative)).abs().max() > 1e-3


def test_composes_with_an_existing_attention_replace():
    model = tiny.build("sd15")
    calls = []

    def counting(q, k, v, extra):
        calls.append(1)
        return default_attention(q, k, v, extra)

    other = model.clone()
    for key in transformer_blocks(model):
        other.set_model_attn2_replace(counting, *key)
    regulated = patched(other, end=0.5)
    ksample(regulated, tiny.conditioning("sd15", 2), tiny.conditioning("sd15", 1), steps=4)
    # Every call still reaches the other patch (the uncond rows and the steps outside the window use it).
    assert len(calls) == 4 * len(transformer_blocks(model))
