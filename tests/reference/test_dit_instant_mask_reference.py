"""Reference test: InstDiffEdit's instant mask on SD3.5's and Flux's joint attention against its maps written
out here.

The maps: for the conditional target rows of every joint attention (image-only attentions skipped), each
image query's probabilities over the text keys, the softmax over the full [text, image] key set taken one
score at a time, averaged over heads, laid out on the token grid (latent side / patch 2), then averaged over
all such calls of the run. A foreign override installed before the pack's (the one it wraps) reads the
attention inputs the pack saw; the run keeps only the running sum.
"""

import math

import pytest
import torch

from attention_edit.attention.instant_mask import instant_mask
from attention_edit.attention.joint import image_text_probabilities
from attention_edit.attention.layout import TARGET
from attention_edit.engine.dit import add_dit_attention
from attention_edit.engine.instant_mask import InstantMaskRun, InstantMaskStrategy, WordGroups
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.inversion import DDIMInversion
from fixtures import tiny_dit

STEPS = 4
WORDS = [[1], [2, 3], [4], [5], [6, 7]]  # token positions of five "words" of the tiny prompt (0: start token)


def plain_text_probabilities(q, k, txt):
    """(rows, image queries, text tokens): per row, head and query an explicit softmax over every key,
    then the text columns, averaged over heads (float64 loops)."""
    rows, heads, n, d = q.shape
    out = torch.zeros(rows, n, txt.stop - txt.start, dtype=torch.float64)
    for r in range(rows):
        for h in range(heads):
            for i in range(n):
                s = [float(q[r, h, i].double() @ k[r, h, j].double()) / math.sqrt(d) for j in range(k.shape[2])]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                z = sum(e)
                for t, j in enumerate(range(txt.start, txt.stop)):
                    out[r, i, t] += e[j] / z / heads
    return out


def test_image_text_probabilities_are_the_joint_softmaxs_text_columns():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 6, 8, generator=g)
    k = torch.randn(2, 3, 11, 8, generator=g)  # 5 text keys, 6 image keys
    got = image_text_probabilities(q, k, slice(0, 5))
    want = plain_text_probabilities(q, k, slice(0, 5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)  # fp32 softmax against float64
    assert float(got.sum(-1).max()) < 1  # the image keys take the rest of each query's mass


def test_sd35_instant_mask_reads_the_joint_attentions_image_to_text_maps():
    model = tiny_dit.build("sd35")
    lat = tiny_dit.latent()
    src, tgt = tiny_dit.conditioning("sd35", 1), tiny_dit.conditioning("sd35", 3)
    _, handle = DDIMInversion.execute(model=model, latent={"samples": lat}, positive=src, negative=None, cfg=1.0,
                                      steps=STEPS, scheduler="simple", strength=1.0).args
    seen = []

    def reader(call, q, k, v, previous, source):  # installed first: the pack's capture wraps it
        run = call.run.mask_run if call.run is not None else None
        if isinstance(run, InstantMaskRun):
            rows = call.cond_rows(TARGET)
            seen.append((call.step, call.joint, call.txt, call.map_hw, q[rows][:, :, call.img].clone(),
                         k[rows].clone()))
        return previous(q, k, v)

    read = model.clone()
    add_dit_attention(read, "reader", reader, effect=lambda branch: None)
    strategy = InstantMaskStrategy([list(w) for w in WORDS], None)  # no word named: the start token's rule
    runs, start = [], strategy.start
    strategy.start = lambda *args: runs.append(start(*args)) or runs[-1]
    out = EditSampler.execute(model=read, source=src, target=tgt, negative=src, cfg=1.0, steps=STEPS,
                              scheduler="simple", pin_source=True, seed=0, inversion=handle,
                              mask_strategy=strategy).args
    edited, source, mask = out[0]["samples"], out[1]["samples"], out[2]
    (run,) = runs
    # SD3.5 medium-like: per model call three joint attentions and one image-only one (block 0), not read
    joint = [s for s in seen if s[1]]
    assert len(joint) == 3 * STEPS and len(seen) == 4 * STEPS
    assert all(s[2] == slice(0, tiny_dit.TEXT_TOKENS) and s[3] == (8, 8) for s in joint)  # the 8 x 8 token grid

    def mean_maps(calls):
        total = sum(plain_text_probabilities(q, k, txt) for _, _, txt, _, q, k in calls) / len(calls)
        return total.transpose(1, 2).reshape(total.shape[0], total.shape[2], 8, 8)  # (images, tokens, h, w)

    maps = mean_maps(joint)
    torch.testing.assert_close(run.accumulator.mean().double(), maps, rtol=1e-5, atol=1e-7)
    assert run.peak_stored == 1 * tiny_dit.TEXT_TOKENS * 8 * 8  # one fixed-size buffer, whatever the steps
    # The word classes of the first step (from its own maps, start token index 0), then the final mask
    first = mean_maps([s for s in joint if s[0][0] == 0]).float()
    _, classes = instant_mask(first, WORDS, (16, 16))
    assert torch.equal(run.classes.is_object, classes.is_object)
    assert torch.equal(run.classes.is_background, classes.is_background)
    want, _ = instant_mask(maps.float(), WORDS, (16, 16), classes=classes)
    latent_mask = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="nearest")
    assert torch.equal(latent_mask, want)
    assert 0 < float(want.mean()) < 1
    outside = (want == 0).expand_as(edited)
    assert (edited - lat)[outside].abs().max() <= 1e-4  # the pinned source outside the mask, exactly
    assert (source - lat).abs().max() <= 1e-4
    assert (edited - lat)[~outside].abs().max() > 1e-2


def flux_clip():
    """A CLIP with Flux's tokenizers (CLIP-L and T5-XXL, the host's FluxTokenizer and its shipped tokenizer
    files) and no text-encoder weights: enough to find words."""
    import comfy.sd
    import comfy.text_encoders.flux

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = comfy.text_encoders.flux.FluxTokenizer(), {}
    return clip


def head_mean_text_probabilities(q, k, txt):
    """(rows, image queries, text tokens): per row and head the scores in float64, an explicit softmax
    (exp of the scores less their maximum, over the sum), the text columns, averaged over heads."""
    rows, heads, n, d = q.shape
    out = torch.zeros(rows, n, txt.stop - txt.start, dtype=torch.float64)
    for r in range(rows):
        for h in range(heads):
            s = (q[r, h].double() @ k[r, h].double().T) / math.sqrt(d)
            e = torch.exp(s - s.max(dim=1, keepdim=True).values)
            out[r] += (e / e.sum(dim=1, keepdim=True))[:, txt] / heads
    return out


def test_head_mean_text_probabilities_matches_the_one_score_at_a_time_softmax():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g)
    torch.testing.assert_close(head_mean_text_probabilities(q, k, slice(0, 4)),
                               plain_text_probabilities(q, k, slice(0, 4)), rtol=1e-12, atol=1e-14)


def test_flux_instant_mask_reads_the_named_words_t5_tokens():
    """On Flux the context is T5's tokens alone: the named word's maps are read at its T5 positions (the
    first word at text token 0, no start token), from every joint attention (double and single blocks)."""
    from attention_edit.engine.tokens import T5, prompt_word_table
    from attention_edit.nodes.instant_mask import InstantMask

    clip, prompt = flux_clip(), "a photo of a red watermelon cat"
    table = prompt_word_table(clip, prompt, T5)
    text_tokens = len(clip.tokenize(prompt)[T5][0])  # the T5 context Flux sees: 256 tokens here
    assert text_tokens == 256
    model = tiny_dit.build("flux")
    lat = tiny_dit.latent()
    src = tiny_dit.conditioning("flux", 1, tokens=text_tokens)
    tgt = tiny_dit.conditioning("flux", 3, tokens=text_tokens)
    _, handle = DDIMInversion.execute(model=model, latent={"samples": lat}, positive=src, negative=None, cfg=1.0,
                                      steps=STEPS, scheduler="simple", strength=1.0).args
    seen = []

    def reader(call, q, k, v, previous, source):  # installed first: the pack's capture wraps it
        run = call.run.mask_run if call.run is not None else None
        if isinstance(run, InstantMaskRun) and call.joint:
            rows = call.cond_rows(TARGET)
            seen.append((call.step, call.txt, call.map_hw, q[rows][:, :, call.img].clone(), k[rows].clone()))
        return previous(q, k, v)

    read = model.clone()
    add_dit_attention(read, "reader", reader, effect=lambda branch: None)
    strategy = InstantMask.execute(target_prompt=prompt, words="cat", map_side=0.25, object_similarity=0.9,
                                   background_similarity=0.6, blur_passes=2, threshold=0.2, clip=clip).args[0]
    groups = [p for _, p in table]
    assert strategy.t5_words.words == groups and strategy.t5_words.edit_words == [groups.index([10])]
    runs, start = [], strategy.start
    strategy.start = lambda *args: runs.append(start(*args)) or runs[-1]
    result = EditSampler.execute(model=read, source=src, target=tgt, negative=src, cfg=1.0, steps=STEPS,
                                 scheduler="simple", pin_source=True, seed=0, inversion=handle,
                                 mask_strategy=strategy)
    out = result.args
    edited, source, mask = out[0]["samples"], out[1]["samples"], out[2]
    (run,) = runs
    # the report names the words of the T5 groups the run read
    report = "".join(result.ui["text"] if isinstance(result.ui, dict) else result.ui.as_dict()["text"])
    objects = report.split("object words: ")[1].split(";")[0].split(", ")
    assert "cat" in objects and set(objects) <= {w for w, _ in table}
    # tiny Flux: 2 double and 2 single blocks, each one joint attention over [256 text, 8 x 8 image] tokens
    assert len(seen) == 4 * STEPS
    assert all(s[1] == slice(0, text_tokens) and s[2] == (8, 8) for s in seen)

    def mean_maps(calls):
        total = sum(head_mean_text_probabilities(q, k, txt) for _, txt, _, q, k in calls) / len(calls)
        total = total[..., :77]  # the buffer keeps the first 77 text tokens (the words are within them)
        return total.transpose(1, 2).reshape(total.shape[0], total.shape[2], 8, 8)

    maps = mean_maps(seen)
    torch.testing.assert_close(run.accumulator.mean().double(), maps, rtol=1e-5, atol=1e-7)
    assert run.peak_stored == 77 * 8 * 8
    # the rule on the T5 groups, the named word ('cat', T5 token 10) as the index word
    first = mean_maps([s for s in seen if s[0][0] == 0]).float()
    t5 = strategy.t5_words
    _, classes = instant_mask(first, t5.words, (16, 16), edit_words=t5.edit_words)
    assert torch.equal(run.classes.is_object, classes.is_object)
    assert torch.equal(run.classes.is_background, classes.is_background)
    assert bool(classes.is_object[0, t5.edit_words[0]])
    want, _ = instant_mask(maps.float(), t5.words, (16, 16), edit_words=t5.edit_words, classes=classes)
    latent_mask = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="nearest")
    assert torch.equal(latent_mask, want)
    assert 0 < float(want.mean()) < 1
    outside = (want == 0).expand_as(edited)
    assert (edited - lat)[outside].abs().max() <= 1e-4  # the pinned source outside the mask, exactly
    assert (source - lat).abs().max() <= 1e-4
    assert (edited - lat)[~outside].abs().max() > 1e-2


def test_flux_refuses_the_instant_mask_without_named_words_before_compute():
    model = tiny_dit.build("flux")
    calls = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"],
                                                                                   **args["c"]))
    t5 = WordGroups([list(w) for w in WORDS], None)  # T5's tokens are the context, no word named
    with pytest.raises(ValueError, match="on Flux needs the word.*named.*no start token"):
        InstantMaskStrategy([list(w) for w in WORDS], None, t5_words=t5).prepare(m)
    with pytest.raises(ValueError, match="on Flux reads the words among T5's tokens: no 'zebra'"):
        InstantMaskStrategy([list(w) for w in WORDS], [0], t5_words="no 'zebra'").prepare(m)
    assert calls == []
