"""Mask strategies on flow-matching DiTs (tiny Flux-dev, SD3.5) through the Edit Sampler and the branch
sampler: the user MASK and UAM's adaptive mask (model-agnostic: x0 differences at the latent); the instant
mask's words on T5's tokens (Flux) and its refusals. The instant mask on the joint attention:
tests/reference/test_dit_instant_mask_reference.py."""

import pytest
import torch

from attention_edit.attention.layout import AUX, SOURCE, TARGET
from attention_edit.engine.adaptive_mask import mask_sigma
from attention_edit.nodes.adaptive_mask import AdaptiveMask
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny, tiny_dit

DITS = ("flux", "sd35")
STEPS = 8


def invert(model, lat, c, steps=STEPS):
    return DDIMInversion.execute(model=model, latent={"samples": lat}, positive=c, negative=None, cfg=1.0,
                                 steps=steps, scheduler="simple", strength=1.0).args[1]


def edit(model, source, target, handle, mask_strategy=None, mask=None, aux=None, pin=True, steps=STEPS):
    # cfg 1: Flux-dev's guidance rides in the conditioning; SD3.5 at cfg 1 inverts exactly
    out = EditSampler.execute(model=model, source=source, target=target, negative=source, cfg=1.0, steps=steps,
                              scheduler="simple", pin_source=pin, seed=0, inversion=handle,
                              mask_strategy=mask_strategy, edit_mask=mask, aux_inversion=aux).args
    return out[0]["samples"], out[1]["samples"], out[2]


def adaptive(t_mask=200.0, recipe="two_trajectories"):
    return AdaptiveMask.execute(lambda_max=0.5, t_mask=t_mask, dilation="edit_region", blend_source=True,
                                recipe=recipe).args[0]


def uniform_model(model):
    return UniformAttention.execute(model=model, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                    blocks="all").args[0]


@pytest.fixture(scope="module", params=DITS)
def world(request):
    name = request.param
    model = tiny_dit.build(name)
    lat = tiny_dit.latent()
    src, tgt = tiny_dit.conditioning(name, 1), tiny_dit.conditioning(name, 3)
    return name, model, lat, src, tgt, invert(model, lat, src)


@pytest.fixture(scope="module")
def uam(world):
    name, model, lat, src, tgt, handle = world
    m = uniform_model(model)
    return m, invert(m, lat, src)


def spy_runs(strategy):
    """The strategy's runs, each with the (step, x0 in, x0 out) of every blend_denoised call."""
    runs, start = [], strategy.start

    def started(*args):
        run = start(*args)
        blend, run.seen = run.blend_denoised, []

        def blend_denoised(i, x, denoised):
            out = blend(i, x, denoised)
            run.seen.append((i, denoised.clone(), out.clone()))
            return out

        run.blend_denoised = blend_denoised
        runs.append(run)
        return run

    strategy.start = started
    return runs


def test_user_mask_keeps_the_source_outside_it_exactly_at_latent_resolution(world):
    """The user MASK blends at the latent's resolution (16 x 16 here), not the token grid (8 x 8, patch 2):
    a mask edge inside a 2 x 2 patch still keeps the unmasked half of that patch exactly."""
    name, model, lat, src, tgt, handle = world
    mask = torch.zeros(1, 128, 128)
    mask[:, 24:96, 40:88] = 1.0  # the 8 px latent grid: rows 3-11, cols 5-10 (odd edges split patches)
    edited, source, out_mask = edit(model, src, tgt, handle, mask=mask)
    inside = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    inside[..., 3:12, 5:11] = True
    outside = ~inside.expand_as(edited)
    assert (edited - lat)[outside].abs().max() <= 1e-4  # the pinned source reconstruction, exactly
    assert (edited - lat)[inside.expand_as(edited)].abs().max() > 1e-2  # the edit happened inside
    # the half patches: row 2 (outside) and row 3 (inside) share token row 1
    assert (edited - lat)[:, :, 2, 5:11].abs().max() <= 1e-4 < (edited - lat)[:, :, 3, 5:11].abs().max()
    assert (source - lat).abs().max() <= 1e-4
    assert torch.equal(out_mask, mask)


@pytest.mark.parametrize("family", DITS)
def test_t_mask_is_the_same_share_of_the_schedule_on_every_flow_model(family):
    """T_mask counts on the 1000-step training schedule. SD3's model sampling takes timesteps on it, Flux's
    on [0, 1]: T_mask 200 is a fifth of the time on both, a sigma inside (0, 1)."""
    ms = tiny_dit.build(family).get_model_object("model_sampling")
    t = 0.2 if family == "flux" else 200.0  # what each model sampling's sigma() takes for a fifth of the time
    want = float(ms.sigma(torch.tensor(t)))
    assert mask_sigma(ms, 200.0) == pytest.approx(want) and 0.0 < want < 1.0
    assert mask_sigma(ms, 0.0) == 0.0 and mask_sigma(ms, 1000.0) == pytest.approx(float(ms.sigma_max))
    sd15 = tiny.build("sd15").get_model_object("model_sampling")  # the UNets: unchanged
    assert mask_sigma(sd15, 200.0) == float(sd15.sigma(torch.tensor(200.0)))


def test_adaptive_mask_blends_target_with_aux_outside_its_mask_in_the_last_steps(world, uam):
    """UAM's official recipe on a DiT: while sigma < sigma(T_mask), outside the mask M (from the target's
    and the source's x0 difference) the target's x0 is the aux branch's, inside the source's is the aux's
    (the red line); the steps before are left as they are."""
    name, model, lat, src, tgt, handle = world
    m, aux = uam
    strategy = adaptive()
    runs = spy_runs(strategy)
    plain, _, _ = edit(m, src, tgt, handle, pin=False)
    edited, source, mask = edit(m, src, tgt, handle, mask_strategy=strategy, aux=aux)
    assert mask.shape == (1, 128, 128) and 0 < float(mask.mean()) < 1
    (run,) = runs
    sigma_mask = mask_sigma(model.get_model_object("model_sampling"), 200.0)
    sigmas = handle.sigmas
    blended_steps = [i for i, before, after in run.seen if not torch.equal(before, after)]
    assert blended_steps == [i for i in range(STEPS) if float(sigmas[i]) < sigma_mask]
    assert 0 < len(blended_steps) < STEPS
    per = 1  # one image: rows source 0, target 1, aux 2 (branch-major)
    rows = {SOURCE: 0 * per, TARGET: 1 * per, AUX: 2 * per}
    for i, before, after in run.seen:
        if i not in blended_steps:
            continue
        tgt0, src0, aux0 = (before[rows[b]] for b in (TARGET, SOURCE, AUX))
        # The official rule written out: Q the q_i-quantile of |x0_src - x0_tgt| over the latent (q_i rising
        # from 0 to lambda 0.5), the edit region |d| > 2 Q grown by a 3 x 3 max, per latent element.
        d = (src0 - tgt0).abs()
        q = torch.quantile(d.flatten(), 0.5 * i / (STEPS - 1))
        region = torch.nn.functional.max_pool2d((d > 2 * q).float()[None], 3, stride=1, padding=1)[0]
        assert 0 < float(region.mean()) < 1, f"step {i}: the edit region is all or nothing"
        torch.testing.assert_close(after[rows[TARGET]], region * tgt0 + (1 - region) * aux0, rtol=0, atol=0)
        torch.testing.assert_close(after[rows[SOURCE]], region * aux0 + (1 - region) * src0, rtol=0, atol=0)
        torch.testing.assert_close(after[rows[AUX]], aux0, rtol=0, atol=0)
    assert float((edited - plain).abs().max()) > 1e-2
    never, _, never_mask = edit(m, src, tgt, handle, mask_strategy=adaptive(t_mask=0.0), aux=aux)
    tiny.assert_same_computation(never, plain, effect=edited - plain)
    assert torch.all(never_mask == 1)


def test_the_pinned_uniform_recipe_keeps_the_source_exact(world, uam):
    name, model, lat, src, tgt, _ = world
    m, uniform_handle = uam
    plain, _, _ = edit(m, src, tgt, uniform_handle)
    edited, source, mask = edit(m, src, tgt, uniform_handle, mask_strategy=adaptive(recipe="uniform_pinned"))
    assert (source - lat).abs().max() <= 1e-4
    assert 0 < float(mask.mean()) < 1
    assert float((edited - plain).abs().max()) > 1e-2


def host_clip(tokenizer_class):
    """A CLIP (the host's class) with a host tokenizer and no text-encoder weights: enough to find words."""
    import comfy.sd

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = tokenizer_class(), {}
    return clip


def flux_clip():
    import comfy.text_encoders.flux

    return host_clip(comfy.text_encoders.flux.FluxTokenizer)


def sd3_clip():
    import comfy.text_encoders.sd3_clip

    return host_clip(comfy.text_encoders.sd3_clip.SD3Tokenizer)


def sd1_clip():
    import comfy.sd1_clip

    return host_clip(comfy.sd1_clip.SD1Tokenizer)


PROMPT = "a photo of a red watermelon cat"


def test_t5_tokens_have_no_start_token_and_the_first_word_at_position_0():
    """Flux's CLIP tokenizes into 'l' (CLIP-L: start token, 77 tokens) and 't5xxl' (T5: no start token, the
    first word at 0, the end token after the words, padding to 256). One word finder reads either: the
    T5 positions are where the host's own T5 tokenizer puts each word's ids."""
    from attention_edit.engine.tokens import T5, first_tokenized, prompt_word_table, tokenized, word_positions

    clip = flux_clip()
    views = tokenized(clip, PROMPT)
    assert set(views) == {"l", T5}
    t5, clip_l = views[T5], views["l"]
    assert (t5.start, t5.end, t5.first) == (None, 1, 0) and len(t5.chunks) == 1 and len(t5.chunks[0]) == 256
    assert clip_l.start == 49406 and clip_l.first == 1 and len(clip_l.chunks[0]) == 77
    # each word's ids from the host's T5 tokenizer alone (the end token it appends left off), laid end to end
    raw = clip.tokenizer.t5xxl.tokenizer
    expected, at = [], 0
    for word in PROMPT.split():
        ids = raw(word)["input_ids"][:-1]
        assert list(t5.chunks[0][at:at + len(ids)]) == ids
        expected.append((word, list(range(at, at + len(ids)))))
        at += len(ids)
    assert t5.ends == (at,) and t5.chunks[0][at] == t5.end  # the end token right after the words
    assert set(t5.chunks[0][at + 1:]) == {0}  # then T5's padding
    table = prompt_word_table(clip, PROMPT, T5)
    assert table == expected
    assert table[0] == ("a", [0, 1])  # T5 splits 'a' into '▁' and 'a': the first word from position 0
    assert dict(table)["watermelon"] == [7, 8, 9] and dict(table)["cat"] == [10]
    assert word_positions(clip, PROMPT, ["red watermelon", "cat"], T5) == [[6, 7, 8, 9], [10]]
    # the default key: the first CLIP-style tokenizer (CLIP-L here), position 0 its start token
    assert first_tokenized(clip, PROMPT).key == "l"
    assert word_positions(clip, PROMPT, ["watermelon", "cat"]) == [[6], [7]]
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        word_positions(clip, PROMPT, ["dog"], T5)


def test_sd3_words_stay_on_clips_tokens():
    """SD3's context starts with CLIP's chunk (T5's tokens after it): the default view is CLIP-G's."""
    from attention_edit.engine.tokens import T5, first_tokenized, tokenized

    clip = sd3_clip()
    views = tokenized(clip, PROMPT)
    assert set(views) == {"g", "l", T5} and views[T5].start is None and views["g"].start is not None
    assert first_tokenized(clip, PROMPT).key == "g"


def test_instant_mask_node_keeps_the_t5_positions_of_named_words():
    from attention_edit.engine.instant_mask import WordGroups
    from attention_edit.nodes.instant_mask import InstantMask

    def node(words, clip):
        return InstantMask.execute(target_prompt=PROMPT, words=words, map_side=0.25, object_similarity=0.9,
                                   background_similarity=0.6, blur_passes=2, threshold=0.2, clip=clip).args[0]

    named = node("cat, red watermelon", flux_clip())
    assert isinstance(named.t5_words, WordGroups)
    assert named.t5_words.words == [[0, 1], [2], [3], [4, 5], [6], [7, 8, 9], [10], [6, 7, 8, 9]]
    assert named.t5_words.edit_words == [6, 7]
    assert named.t5_words.names == ["a", "photo", "of", "a", "red", "watermelon", "cat", "red watermelon"]
    assert named.words[:7] == [[1], [2], [3], [4], [5], [6], [7]]  # CLIP-L's, for SD3 and the UNets
    assert node("", flux_clip()).t5_words.edit_words is None  # nothing named: Flux refuses it (no start token)
    assert node("cat", sd1_clip()).t5_words is None  # a CLIP without T5 tokens: its own tokens are the context


def test_flux_refuses_the_instant_mask_by_name_before_compute():
    """On Flux.1 (a CLIP with T5's tokenizer) no word named is refused when the strategy is prepared, before
    any model call; with words named and T5's positions it prepares. A CLIP-prompted Flux (a CLIP without T5
    tokens, as the toy flow world) reads the CLIP tokens, start token first: the paper's rule, words or not."""
    from attention_edit.nodes.instant_mask import InstantMask

    model = tiny_dit.build("flux")
    calls = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"],
                                                                                   **args["c"]))

    def node(words, clip):
        return InstantMask.execute(target_prompt=PROMPT, words=words, map_side=0.25, object_similarity=0.9,
                                   background_similarity=0.6, blur_passes=2, threshold=0.2, clip=clip).args[0]

    with pytest.raises(ValueError, match="on Flux needs the word.*named.*start token's map.*no start token"):
        node("", flux_clip()).prepare(m)
    with pytest.raises(ValueError, match="'zebra' is not in the prompt"):
        node("zebra", flux_clip())  # a word the prompt does not have: refused by the node itself
    assert node("", sd1_clip()).prepare(m) is not m and node("cat", sd1_clip()).prepare(m) is not m
    prepared = node("cat", flux_clip()).prepare(m)
    assert prepared is not m and calls == []
    sd35 = tiny_dit.build("sd35")  # SD3.5 keeps the paper's no-word rule (CLIP's start token is text token 0)
    assert node("", sd3_clip()).prepare(sd35) is not sd35
