"""InstDiffEdit's mask estimation against the official algorithm, written out plainly.

Official code (xiaotianqing/InstDiffEdit, model/InstDiffEdit.py, util.py, attention_store.py), read for its
semantics:
- start: the image latent noised with random noise to the timestep of strength r = 0.5 (the last
  int(N * r) of N = 50 steps), one latent per noise sample (3), all in one batch; denoised with the
  target prompt, cfg 7.5;
- maps: the conditional half's cross-attention probabilities at the 16x16 layers of the down and up
  blocks, averaged over steps so far, layers, samples and heads;
- per word: the mean of its tokens' maps, scaled by its maximum, resized to the latent size; the start
  token's map inverted; each min-max normalised;
- index word: the word most similar (cosine) to the inverted start-token map; then every word with
  cosine >= 0.9 to the index word is object, <= 0.6 background, decided at the first step only;
- refined = minmax(mean object maps) - minmax(mean background maps), clamped at 0; a 5x5 Gaussian blur
  twice (OpenCV, sigma 0 -> 1.1, mirrored border), min-max normalised, mask = refined > 0.2;
- after every step the latent outside the mask is the noised original (paper: x_t <- M x_t + (1 - M)
  (x_0 + sigma_t eps), the same eps as the start).

Everything here is written without the pack's attention/ or engine/ helpers: an explicit per-head softmax
in float64, loops over words, steps, layers and samples, a blur with explicit border indices, and the
sampling loop itself (linear multistep of order 4 in sigma space with its own quadrature, and Euler). The
checks:
- the mask rule alone on random and structured maps, in float64: the same index word, classes and mask;
- whole estimations of the pack (engine.instant_mask_estimate) on the tiny SD1.x (eps), SD2.x (v) and
  SDXL models, LMS (the official scheduler) and Euler, against the reference loop run through the host's
  sample_custom with the reference's own sampler function and attn2 patch: the same maps (up to float32
  drift, relative to what averaging over the samples changes), the same classes, and the same mask
  wherever the reference's refined map is not within float error of the threshold.
"""

from __future__ import annotations

import math

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import pytest
import torch
import torch.nn.functional as F

from attention_edit.attention import instant_mask as pack_rule
from attention_edit.engine.instant_mask_estimate import MaskSettings, estimate_instant_mask
from fixtures import tiny

STEPS = 8
STRENGTH = 0.5
SAMPLES = 3
CFG = 7.5
SEED = 5
OBJECT, BACKGROUND, PHI = 0.9, 0.6, 0.2
WORDS = [[1], [2, 3], [4], [5], [6], [7]]  # token positions of six "words" (one of two tokens)
# float32 maps carry ~1e-6 relative error; after normalisation and two blurs a pixel whose refined value is
# this close to phi may fall either side. A wrong rule moves whole regions, not pixels at 1e-4 of phi.
BORDERLINE = 1e-4


# ---------------------------------------------------------------- the reference rule, written plainly

def softmax(row: torch.Tensor) -> torch.Tensor:
    e = torch.exp(row - row.max())
    return e / e.sum()


def head_mean_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """One row's (queries, tokens) probabilities, averaged over heads, float64."""
    d = q.shape[-1] // heads
    total = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for h in range(heads):
        qh, kh = q[:, h * d:(h + 1) * d].double(), k[:, h * d:(h + 1) * d].double()
        scores = qh @ kh.T / math.sqrt(d)
        total += torch.stack([softmax(scores[i]) for i in range(scores.shape[0])])
    return total / heads


def to_latent_size(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map scaled by its maximum (the official 8-bit image), resized bicubically, clipped to [0, 1]."""
    m = m / m.max()
    if tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
    return m.clamp(0.0, 1.0)


def minmax(m: torch.Tensor) -> torch.Tensor:
    span = float(m.max() - m.min())
    return (m - m.min()) / span if span > 0 else torch.zeros_like(m)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(), b.flatten()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def word_images(maps: torch.Tensor, words, size, invert_start=True):
    """maps (tokens, h, w) -> (start image, [word images]) as the official token_combination makes them."""
    start = to_latent_size(maps[0], size)
    start = minmax(1.0 - start if invert_start else start)
    images = []
    for group in words:
        merged = sum(maps[t] for t in group) / len(group)
        images.append(minmax(to_latent_size(merged, size)))
    return start, images


def classify(start, images, named=None):
    """(index word, object flags, background flags): the official get_position, or named words as index."""
    if named:
        reference = sum(images[i] for i in named) / len(named)
        index = -1
    else:
        index, best = 0, -1.0
        for i, image in enumerate(images):
            c = cosine(image, start)
            if c > best:
                index, best = i, c
        reference = images[index]
    is_object, is_background = [], []
    for i, image in enumerate(images):
        c = 1.0 if i == index else cosine(image, reference)
        forced = i == index or (named is not None and i in named)
        is_object.append(forced or c >= OBJECT)
        is_background.append(not is_object[-1] and c <= BACKGROUND)
    return index, is_object, is_background


def opencv_blur(img: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(img, (5, 5), 0): sigma 0.3 * ((5 - 1) * 0.5 - 1) + 0.8, BORDER_REFLECT_101."""
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    g = [math.exp(-((i - 2) ** 2) / (2 * sigma * sigma)) for i in range(5)]
    g = [v / sum(g) for v in g]
    h, w = img.shape

    def mirror(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    rows = torch.zeros_like(img)
    for y in range(h):
        for x in range(w):
            rows[y, x] = sum(g[j] * img[y, mirror(x + j - 2, w)] for j in range(5))
    out = torch.zeros_like(img)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(g[j] * rows[mirror(y + j - 2, h), x] for j in range(5))
    return out


def refined_and_mask(images, is_object, is_background):
    objects = minmax(sum(m for m, o in zip(images, is_object) if o) / sum(is_object))
    if any(is_background):
        back = minmax(sum(m for m, b in zip(images, is_background) if b) / sum(is_background))
        img = (objects - back).clamp(min=0.0)
    else:
        img = objects
    img = minmax(opencv_blur(opencv_blur(img)))
    return img, (img > PHI).double()


def reference_mask(maps, words, size, named=None, classes=None, invert_start=True):
    """One image's mask from its mean maps (tokens, h, w): (mask, refined, classes)."""
    start, images = word_images(maps.double(), words, size, invert_start)
    if classes is None:
        classes = classify(start, images, named)
    refined, mask = refined_and_mask(images, classes[1], classes[2])
    return mask, refined, classes


def assert_masks_agree(pack_mask: torch.Tensor, ref_mask: torch.Tensor, refined: torch.Tensor) -> None:
    clear = (refined - PHI).abs() > BORDERLINE
    assert clear.float().mean() > 0.9, "the refined map sits on the threshold: the case tells nothing apart"
    assert torch.equal(pack_mask.double()[clear], ref_mask[clear])


# ---------------------------------------------------------------- the rule alone

def structured_maps(seed: int, with_box: bool = False):
    """(1, 77, 4, 4) probabilities: an object box the object words share, the start token on the
    background, a background word, noise elsewhere (and the box, when asked)."""
    g = torch.Generator().manual_seed(seed)
    inside = torch.zeros(4, 4, dtype=torch.float64)
    y, x = int(torch.randint(0, 2, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))
    inside[y:y + 2, x:x + 2] = 1.0
    logits = torch.randn(77, 4, 4, generator=g, dtype=torch.float64) * 0.3
    logits[0] += 3.0 * (1 - inside)
    for t in (2, 3, 4):
        logits[t] += 2.5 * inside
    logits[6] += 1.5 * (1 - inside)
    maps = torch.softmax(logits, dim=0)[None]
    return (maps, inside) if with_box else maps


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("named", [None, [2]])
def test_mask_rule_matches_the_official_rule(seed, named):
    if seed % 2:
        maps = structured_maps(seed)
    else:
        g = torch.Generator().manual_seed(seed)
        maps = torch.softmax(torch.randn(1, 77, 4, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    size = (16, 16)
    mask, classes = pack_rule.instant_mask(maps, WORDS, size, edit_words=named, object_similarity=OBJECT,
                                           background_similarity=BACKGROUND, threshold=PHI)
    ref, refined, (index, is_object, is_background) = reference_mask(maps[0], WORDS, size, named)
    if named is None:
        assert int(classes.index[0]) == index
    assert classes.is_object[0].tolist() == is_object
    assert classes.is_background[0].tolist() == is_background
    assert_masks_agree(mask[0, 0], ref, refined)


def test_mask_rule_on_a_known_object_finds_it_through_the_inverted_start_token():
    size = (16, 16)
    for seed in range(1, 12, 2):
        maps, inside = structured_maps(seed, with_box=True)
        _, _, (index, is_object, is_background) = reference_mask(maps[0], WORDS, size)
        assert index in (1, 2) and is_object[1] and is_object[2] and is_background[4]  # tokens 2-4 on the object
        mask, _ = pack_rule.instant_mask(maps, WORDS, size)
        box = inside.repeat_interleave(4, 0).repeat_interleave(4, 1).bool()
        m = mask[0, 0].bool()
        # the box's corners fall under phi after the bicubic resize and the blurs; nothing far outside it
        assert float((m & box).sum() / (m | box).sum()) > 0.75 and float(m[~box].float().mean()) < 0.1


# ---------------------------------------------------------------- whole estimations on the tiny models

def lagrange_integral(points, j, a, b, n=64):
    """The integral over [a, b] of the Lagrange basis polynomial of points[j] (Gauss-Legendre, exact for
    these degrees)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    total = 0.0
    for t, w in zip(nodes, weights):
        tau = (b - a) / 2 * t + (a + b) / 2
        value = 1.0
        for k, p in enumerate(points):
            if k != j:
                value *= (tau - p) / (points[j] - p)
        total += w * value * (b - a) / 2
    return total


class ReferenceEstimate:
    """The official estimation loop, plainly: its own attn2 patch (maps only; the layer's output is the
    host's kernel, so both runs see the same model) and its own Euler loop with the latent replacement."""

    def __init__(self, model, words, named=None, samples=SAMPLES, order=1):
        self.words, self.named, self.samples, self.order = words, named, samples, order
        self.step_maps: list = []  # per step: per layer call: per row (cond rows, sample-major) (tokens, h, w)
        self.classes = None
        self.model = model.clone()
        unet = model.model.diffusion_model
        for name, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks)):
            for number, block in enumerate(blocks):
                for layer in block:
                    for j in range(len(getattr(layer, "transformer_blocks", []))):
                        self.model.set_model_attn2_replace(self.patch, name, number, j)

    def patch(self, q, k, v, extra_options, **kwargs):
        heads = extra_options["n_heads"]
        h, w = extra_options["original_shape"][-2:]
        if q.shape[1] == (h // 4) * (w // 4):  # a layer at a quarter of the latent side
            chunks = extra_options["cond_or_uncond"]
            per = q.shape[0] // len(chunks)
            layer = []
            for c, kind in enumerate(chunks):
                if kind == 0:
                    for r in range(c * per, (c + 1) * per):
                        p = head_mean_probabilities(q[r], k[r], heads)  # (h*w, tokens)
                        layer.append(p.T.reshape(p.shape[1], h // 4, w // 4))
            self.step_maps[-1].append(layer)
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)

    def mean_maps(self) -> list[torch.Tensor]:
        """Per image: the mean over steps, layers, samples (and heads, already) of the maps."""
        rows = len(self.step_maps[0][0])
        images = rows // self.samples
        out = []
        for i in range(images):
            total, n = 0, 0
            for step in self.step_maps:
                for layer in step:
                    for s in range(self.samples):
                        total = total + layer[s * images + i]
                        n += 1
            out.append(total / n)
        return out

    def masks(self, size):
        maps = self.mean_maps()
        if self.classes is None:
            self.classes = [reference_mask(m, self.words, size, self.named)[2] for m in maps]
        return [reference_mask(m, self.words, size, self.named, c) for m, c in zip(maps, self.classes)]

    def run(self, latent, positive, negative, seed=SEED):
        full = comfy.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        k = int(STEPS * STRENGTH)
        sigmas = full[STEPS - k:]
        batch = torch.cat([latent] * self.samples)
        noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(seed))
        x0 = self.model.model.process_latent_in(batch)  # the latent in the model's space
        size = tuple(latent.shape[-2:])

        def step_with_replacement(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            derivatives = []
            for i in range(len(sigmas) - 1):
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                self.step_maps.append([])
                denoised = model_k(x, sigmas[i] * torch.ones(x.shape[0]), **(extra_args or {}))
                derivatives.append((x - denoised) / s)
                if s_next == 0:
                    x = denoised
                else:  # linear multistep: the Lagrange polynomial through the last derivatives, integrated
                    used = derivatives[-self.order:]
                    points = [float(sigmas[i - j]) for j in range(len(used))]
                    for j, d in enumerate(reversed(used)):
                        x = x + lagrange_integral(points, j, s, s_next) * d
                mask = torch.stack([m for m, _, _ in self.masks(size)] * self.samples)[:, None].to(x)
                x = mask * x + (1 - mask) * (x0 + s_next * noise)
            return x

        sampler = comfy.samplers.KSAMPLER(step_with_replacement)
        comfy.sample.sample_custom(self.model, noise, CFG, sampler, sigmas, positive, negative, batch, seed=seed)
        return self.masks(size)


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request):
    return request.param, tiny.build(request.param)


def pack_estimate(model, lat, positive, negative, named=None, samples=SAMPLES, seed=SEED, sampler="lms"):
    settings = MaskSettings([list(w) for w in WORDS], named, object_similarity=OBJECT, background_similarity=BACKGROUND,
                            threshold=PHI)
    return estimate_instant_mask(model, lat, positive, negative, settings, STRENGTH, samples, seed, STEPS, CFG,
                                 sampler_name=sampler, scheduler="normal")


@pytest.mark.parametrize("named,sampler", [(None, "lms"), ([1], "lms"), (None, "euler")],
                         ids=["index-word-lms", "named-word-lms", "index-word-euler"])
def test_estimate_matches_the_official_loop(family, named, sampler):
    name, model = family
    lat = tiny.latent(batch=2, seed=3)
    positive, negative = tiny.conditioning(name, 11), tiny.conditioning(name, 12)
    with torch.inference_mode():
        pack = pack_estimate(model, lat, positive, negative, named, sampler=sampler)
        reference = ReferenceEstimate(model, WORDS, named, order=4 if sampler == "lms" else 1)
        ref = reference.run(lat, positive, negative)
        one_sample = pack_estimate(model, lat, positive, negative, named, samples=1, sampler=sampler)
    ref_maps = torch.stack(reference.mean_maps())[:, :77]
    assert reference.step_maps and len(reference.step_maps) == int(STEPS * STRENGTH)
    # The maps: what averaging over the three noise samples changes is the effect a mistake would show.
    tiny.assert_same_computation(pack.maps.double(), ref_maps, effect=one_sample.maps.double() - ref_maps)
    for i, (mask, refined, (index, is_object, is_background)) in enumerate(ref):
        if named is None:
            assert int(pack.classes.index[i]) == index
        assert pack.classes.is_object[i].tolist() == is_object
        assert pack.classes.is_background[i].tolist() == is_background
        assert_masks_agree(pack.mask[i, 0], mask, refined)
    assert pack.steps == int(STEPS * STRENGTH)


def test_classes_are_those_of_the_first_step(family):
    """The reference keeps the first step's classes; a rule that re-decides them from the final maps would
    differ wherever the two disagree: check the pack keeps the first step's on every family."""
    name, model = family
    lat = tiny.latent(seed=4)
    positive, negative = tiny.conditioning(name, 21), tiny.conditioning(name, 22)
    with torch.inference_mode():
        pack = pack_estimate(model, lat, positive, negative)
        reference = ReferenceEstimate(model, WORDS, order=4)
        reference.run(lat, positive, negative)
    first = [reference_mask(torch.stack([layer[s] for layer in reference.step_maps[0] for s in range(SAMPLES)]).mean(0),
                            WORDS, tuple(lat.shape[-2:]))[2]]
    assert pack.classes.is_object[0].tolist() == first[0][1]
    assert pack.classes.is_background[0].tolist() == first[0][2]
