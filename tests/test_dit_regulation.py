"""Attention regulation on the joint attention of Flux and SD3.5 (engine/dit_regulation.py) on the tiny DiTs
through the host's KSampler: where it acts (conditional rows, image queries, selected blocks, steps in the
window), that it composes with an override already set, the SD3 word lookup and the refusals."""

import nodes as comfy_nodes
import pytest
import torch

from attention_edit.engine.dit import OVERRIDE_KEY, add_dit_attention, dit_patches
from attention_edit.engine.dit_methods import apply_uniform_attention_dit
from attention_edit.engine.dit_regulation import DEFAULT_DIT_BLOCKS, regulation_blocks_dit
from attention_edit.engine.regulation import DEFAULT_BLOCKS, TokenPlan, apply_attention_regulation, find_target_tokens
from attention_edit.nodes.regulation import AttentionRegulation
from fixtures import tiny_dit

STEPS, END = 4, 0.5  # steps 0 and 1 regulated
PLAN = TokenPlan.from_positions([[3], [6, 7]], end=9, words=("cat", "big dog"))
N_TXT, N_IMG = tiny_dit.TEXT_TOKENS, 64  # latent 16: an 8 x 8 token grid


def ksample(model, family, cfg=2.0, steps=STEPS):
    (out,) = comfy_nodes.KSampler().sample(model, 0, steps, cfg, "euler", "simple", tiny_dit.conditioning(family, 1),
                                           tiny_dit.conditioning(family, 2), {"samples": tiny_dit.latent()}, 1.0)
    return out["samples"]


def watched(model):
    """A clone with a pack override outside the regulation: per attention call, its block, step, rows'
    chunks, and where its output (the regulated one) differs from plain attention on the same inputs."""
    seen = []

    def watch(call, q, k, v, previous, source):
        got = previous(q, k, v)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        changed = (got - plain).abs().amax(dim=(1, 3)) > 1e-5 * float(plain.abs().max())  # (batch, tokens)
        seen.append(dict(block=call.block, step=call.step, chunks=call.chunks, per=call.rows_per_chunk,
                         txt=call.txt, img=call.img, changed=changed, size=float((got - plain).abs().max())))
        return got

    m = model.clone()
    add_dit_attention(m, "watch", watch)
    return m, seen


@pytest.mark.parametrize("family", tiny_dit.FAMILIES)
@pytest.mark.parametrize("blocks", [DEFAULT_BLOCKS, "all"])
def test_only_image_queries_of_conditional_rows_in_selected_blocks_and_steps_change(family, blocks):
    model = tiny_dit.build(family)
    regulated = apply_attention_regulation(model, PLAN, END, blocks=blocks)
    chosen = {(b.kind, b.index) for b in regulation_blocks_dit(model, blocks)}
    if blocks == DEFAULT_BLOCKS:  # depth:0.25-0.625 of the tiny models' 4 (Flux) and 3 (SD3.5) blocks
        assert chosen == ({("double", 1), ("single", 0)} if family != "sd35" else {("double", 1)})
    m, seen = watched(regulated)
    ksample(m, family)
    active = 0
    for s in seen:
        cond = [r for r in range(s["changed"].shape[0]) if s["chunks"][r // s["per"]] == 0]
        joint = s["block"][2] == 0
        if joint and s["block"][:2] in chosen and s["step"][0] < END * STEPS:
            active += 1
            assert 0 < len(cond) < s["changed"].shape[0], s["chunks"]  # cond and uncond in one call (cfg 2)
            for r in range(s["changed"].shape[0]):
                # the image queries of the conditional rows change (every one of them: the bias is a smooth
                # bump field), the text queries and the unconditional rows do not
                assert bool(s["changed"][r, s["img"]].all()) == (r in cond), (s["block"], r)
                assert not s["changed"][r, s["txt"]].any()
        else:
            assert not s["changed"].any(), (s["block"], s["step"], s["size"])
    steps_seen = {s["step"][0] for s in seen}
    assert steps_seen == set(range(STEPS))
    assert active == len(chosen) * int(END * STEPS)
    if family == "sd35" and blocks == "all":  # SD3.5 medium's image-only attention is seen and left alone
        assert any(s["block"][2] == 1 for s in seen)


@pytest.mark.parametrize("family", tiny_dit.FAMILIES)
def test_the_output_changes_and_an_empty_window_or_no_words_leave_it_exactly(family):
    model = tiny_dit.build(family)
    stock = ksample(model, family)
    assert float((ksample(apply_attention_regulation(model, PLAN, END), family) - stock).abs().max()) > 0
    torch.testing.assert_close(ksample(apply_attention_regulation(model, PLAN, 0.0), family), stock, rtol=0, atol=0)
    assert apply_attention_regulation(model, None, END) is model


@pytest.mark.parametrize("family", tiny_dit.FAMILIES)
def test_runs_are_reproducible_and_the_state_resets_per_run(family):
    """The moving average carries one run's optima to its next step only: a second run of the same patched
    model gives the first run's result."""
    model = apply_attention_regulation(tiny_dit.build(family), PLAN, 1.0, blocks="all")
    torch.testing.assert_close(ksample(model, family), ksample(model, family), rtol=0, atol=0)


@pytest.mark.parametrize("family", ("flux", "sd35"))
def test_composes_with_a_foreign_override_and_the_packs_own(family):
    model = tiny_dit.build(family)
    calls = []

    def foreign(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs) * 1.01  # an effect of its own, which the regulation must keep

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = foreign
    with_foreign = ksample(m, family)
    n_foreign = len(calls)
    regulated = apply_attention_regulation(m, PLAN, END)
    assert regulated.model_options["transformer_options"][OVERRIDE_KEY].previous is foreign
    calls.clear()
    out = ksample(regulated, family)
    assert len(calls) > n_foreign  # every attention still runs through it (the regulated ones several times)
    assert float((out - with_foreign).abs().max()) > 0
    # without the foreign override the result is another one: its effect is kept under the regulation
    assert float((out - ksample(apply_attention_regulation(model, PLAN, END), family)).abs().max()) > 0
    # on top of the pack's uniform attention (another method on the same blocks): both in the chain
    uam = apply_uniform_attention_dit(model, "all", 0.0, 1.0, "all")
    both = apply_attention_regulation(uam, PLAN, END, blocks="all")
    assert [p.method for p in dit_patches(both)] == ["attention regulation", "uniform"]
    assert float((ksample(both, family) - ksample(uam, family)).abs().max()) > 0


class Sd3Clip:
    """What the node uses of SD3's CLIP: tokenize(), with the host's SD3 tokenizer (CLIP-L, CLIP-G, T5)."""

    def __init__(self):
        from comfy.text_encoders import sd3_clip

        self.tokenizer = sd3_clip.SD3Tokenizer()

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


@pytest.fixture(scope="module")
def sd3_clip():
    return Sd3Clip()


def node(model, clip, words, blocks=DEFAULT_BLOCKS, end_percent=END, prompt="a photo of a cat and a dog"):
    return AttentionRegulation.execute(model=model, clip=clip, prompt=prompt, target_words=words,
                                       end_percent=end_percent, iterations=20, learning_rate=100.0, ema=0.25,
                                       decay=0.99, peak_target=0.9, share_weight=80.0, beta=0.09, blocks=blocks,
                                       map_side=0.25).args[0]


def test_node_on_sd35_finds_the_words_among_the_clip_tokens_of_the_conditioning(sd3_clip):
    """SD3's text tokens start with its CLIP-L / CLIP-G chunk: [start, a, photo, of, a, cat, and, a, dog, end]
    puts cat at 5 and dog at 8; the node regulates exactly what the engine does with those positions."""
    model = tiny_dit.build("sd35")
    by_node = node(model, sd3_clip, "cat, dog")
    by_positions = apply_attention_regulation(model, TokenPlan.from_positions([[5], [8]], end=9), END)
    stock = ksample(model, "sd35")
    torch.testing.assert_close(ksample(by_node, "sd35"), ksample(by_positions, "sd35"), rtol=0, atol=0)
    assert float((ksample(by_node, "sd35") - stock).abs().max()) > 0
    assert node(model, sd3_clip, "") is model


def test_validation_accepts_dit_block_specs():
    ok = dict(end_percent=0.5, learning_rate=100.0, ema=0.25, decay=0.99, peak_target=0.9, share_weight=80.0,
              beta=0.09, map_side=0.25)
    for blocks in (DEFAULT_BLOCKS, DEFAULT_DIT_BLOCKS, "double:1", "single, depth:0.5-1", "all"):
        assert AttentionRegulation.validate_inputs(blocks=blocks, **ok) is True
    assert isinstance(AttentionRegulation.validate_inputs(blocks="sideways", **ok), str)


class FluxClip(Sd3Clip):
    """Flux's tokenizers: CLIP-L (pooled only) and T5, whose tokens are Flux's text tokens."""

    def __init__(self):
        from comfy.text_encoders import flux

        self.tokenizer = flux.FluxTokenizer()


@pytest.mark.parametrize("family", ("flux", "flux_schnell"))
def test_node_on_flux_finds_the_words_among_the_t5_tokens(family):
    """T5 has no start token: [a (2 tokens), photo, of, a, cat, and, a, dog, end] puts cat at 6, dog at 10 and
    the end token at 11, the one restored."""
    model = tiny_dit.build(family)
    by_node = node(model, FluxClip(), "cat, dog")
    plan = TokenPlan(words=("cat", "dog"), groups=(((0, 6),), ((0, 10),)), keep=((0, 11),))
    torch.testing.assert_close(ksample(by_node, family), ksample(apply_attention_regulation(model, plan, END), family),
                               rtol=0, atol=0)
    assert float((ksample(by_node, family) - ksample(model, family)).abs().max()) > 0


def test_a_clip_prompted_flux_reads_the_words_among_the_clip_tokens():
    """Flux.1's context is T5's tokens; a Flux prompted through a CLIP without a T5 tokenizer (the toy flow world)
    has the CLIP tokens as its context, start token first: the words are found there, as on SD3."""
    from test_regulation import clip_for

    from attention_edit.engine.dit_regulation import CLIP_KEYS, regulation_token_keys
    from attention_edit.engine.tokens import T5

    clip = clip_for("sd15")
    assert regulation_token_keys("flux", clip) == CLIP_KEYS
    assert regulation_token_keys("flux") == (T5,)
    plan = find_target_tokens(clip, "a photo of a cat", "cat", keys=CLIP_KEYS)
    assert plan.groups == (((0, 5),),)  # chunk 0, after the start token: a photo of a cat
    assert (0, 0) in plan.keep  # the start token, restored as on the UNet
    assert node(tiny_dit.build("flux"), clip, "cat") is not None


def test_bad_requests_on_a_dit_are_refused_before_sampling(sd3_clip):
    model = tiny_dit.build("sd35")
    with pytest.raises(ValueError, match="target word 'horse' not found"):
        node(model, sd3_clip, "cat, horse")
    with pytest.raises(ValueError, match="matches no block.*3 blocks"):
        node(model, sd3_clip, "cat", blocks="single")
    with pytest.raises(ValueError, match="unknown DiT block 'input'"):
        node(model, sd3_clip, "cat", blocks="input, middle")
    with pytest.raises(ValueError, match="end_percent"):
        apply_attention_regulation(model, PLAN, 1.5)
    with pytest.raises(ValueError, match="matches no block"):
        apply_attention_regulation(tiny_dit.build("flux"), PLAN, END, blocks="double:5")


def test_words_past_the_calls_text_tokens_stop_with_a_clear_error():
    """Positions the conditioning does not have (words found in another prompt than the one encoded)."""
    model = apply_attention_regulation(tiny_dit.build("sd35"), TokenPlan.from_positions([[40]], end=41), END)
    with pytest.raises(ValueError, match="text tokens up to 41.*16 text tokens"):
        ksample(model, "sd35", steps=1)
