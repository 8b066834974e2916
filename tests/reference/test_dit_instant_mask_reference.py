"""Reference test: InstDiffEdit's instant mask on SD3.5's joint attention against its maps written out here.

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
from attention_edit.engine.instant_mask import InstantMaskRun, InstantMaskStrategy
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


def test_flux_refuses_the_instant_mask_by_name_before_compute():
    model = tiny_dit.build("flux")
    calls = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"],
                                                                                   **args["c"]))
    for named in (None, [0]):
        with pytest.raises(ValueError, match="instant mask.*not supported on Flux.*T5.*SD3"):
            InstantMaskStrategy([list(w) for w in WORDS], named).prepare(m)
    assert calls == []
