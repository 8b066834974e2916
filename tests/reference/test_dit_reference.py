"""Reference tests: the pack's methods on joint attention (Flux, SD3.5) against the joint-attention math
written out here, one query at a time with an explicit softmax over [text, image] keys.

The first group checks attention/joint.py on random tensors; the second checks what the patched tiny
Flux and SD3.5 models compute inside a real block: the attention inputs are read by a foreign override
installed before the pack's (the one the pack wraps), the output by one installed after it.
"""

import math

import pytest
import torch

from attention_edit.attention.joint import (
    fpe_joint,
    masactrl_joint,
    uniform_text_keep_mass,
    uniform_text_mean_keys,
)
from attention_edit.attention.layout import SOURCE, TARGET, BranchLayout
from attention_edit.engine.contract import EditRunContext, with_run
from attention_edit.engine.dit_methods import apply_injection_dit, apply_uniform_attention_dit
from attention_edit.engine.injection import fpe_steps
from fixtures import tiny_dit

T, N_IMG, HEADS, D = 5, 7, 2, 8
TXT, IMG = slice(0, T), slice(T, T + N_IMG)


def attend(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def explicit(q, k, v, weights_fn):
    """out[b, h, i] = sum_j w_ij v_j with w = weights_fn(b, h, i, scores over all keys) (loops, float64)."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                s = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(q.shape[3]) for j in range(k.shape[2])]
                w = weights_fn(b, h, i, s)
                for j, wj in enumerate(w):
                    out[b, h, i] += wj * v[b, h, j].double()
    return out


def softmax(s):
    top = max(s)
    e = [math.exp(x - top) for x in s]
    z = sum(e)
    return [x / z for x in e]


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, HEADS, T + N_IMG, D, generator=g, dtype=torch.float64) for _ in range(3)]


def test_uniform_keep_mass_gives_each_text_token_the_mean_of_the_texts_mass(qkv):
    q, k, v = qkv
    qi = q[:, :, IMG]

    def weights(b, h, i, s):
        p = softmax(s)
        m = sum(p[:T])
        return [m / T] * T + p[T:]

    full = attend(qi, k, v)
    torch.testing.assert_close(uniform_text_keep_mass(attend, qi, k, v, TXT, full), explicit(qi, k, v, weights))


def test_uniform_mean_keys_is_the_softmax_with_text_scores_replaced_by_their_mean(qkv):
    q, k, v = qkv
    qi = q[:, :, IMG]
    v_mean = v.clone()
    v_mean[:, :, TXT] = v[:, :, TXT].mean(dim=2, keepdim=True)

    def weights(b, h, i, s):
        mean = sum(s[:T]) / T
        return softmax([mean] * T + s[T:])

    torch.testing.assert_close(uniform_text_mean_keys(attend, qi, k, v, TXT), explicit(qi, k, v_mean, weights))


def test_fpe_joint_keeps_the_targets_text_mass_and_spreads_the_rest_like_the_source(qkv):
    q_t, k_t, v_t = qkv
    g = torch.Generator().manual_seed(1)
    q_s, k_s = (torch.randn(2, HEADS, N_IMG, D, generator=g, dtype=torch.float64) for _ in range(2))
    qi = q_t[:, :, IMG]
    want = torch.zeros(2, HEADS, N_IMG, D, dtype=torch.float64)
    for b in range(2):
        for h in range(HEADS):
            for i in range(N_IMG):
                s_t = [float(qi[b, h, i] @ k_t[b, h, j]) / math.sqrt(D) for j in range(T + N_IMG)]
                p_t = softmax(s_t)
                m = sum(p_t[:T])
                p_s = softmax([float(q_s[b, h, i] @ k_s[b, h, j]) / math.sqrt(D) for j in range(N_IMG)])
                for j in range(T):  # the target's own attention to its text
                    want[b, h, i] += p_t[j] * v_t[b, h, j]
                for j in range(N_IMG):  # the source's image-image distribution, the target's values
                    want[b, h, i] += (1 - m) * p_s[j] * v_t[b, h, T + j]
    torch.testing.assert_close(fpe_joint(attend, qi, k_t, v_t, IMG, q_s, k_s), want)


def test_masactrl_joint_queries_the_sources_image_keys_and_values_beside_the_targets_text(qkv):
    q_t, k_t, v_t = qkv
    g = torch.Generator().manual_seed(2)
    k_s, v_s = (torch.randn(2, HEADS, N_IMG, D, generator=g, dtype=torch.float64) for _ in range(2))
    keys = torch.cat([k_t[:, :, TXT], k_s], dim=2)
    values = torch.cat([v_t[:, :, TXT], v_s], dim=2)
    k2, v2 = masactrl_joint(k_t, v_t, IMG, k_s, v_s)
    torch.testing.assert_close(attend(q_t, k2, v2), explicit(q_t, keys, values, lambda b, h, i, s: softmax(s)))


# --- inside the real blocks of the tiny models -------------------------------------------------------------

class Spy:
    """A foreign attention override: records (q, k, v, out) of every call in [B, H, N, D] float64."""

    def __init__(self, previous=None):
        self.previous, self.calls = previous, []

    def __deepcopy__(self, memo):  # 0.3.75's clone deep-copies model options: stay one spy
        return self

    def __call__(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs["heads"]

        def bhnd(t, already):
            if already:
                return t.double()
            return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).double()

        inputs = [bhnd(t, kwargs.get("skip_reshape", False)) for t in args[:3]]
        self.calls.append((*inputs, bhnd(out, kwargs.get("skip_output_reshape", False))))
        return out


def run_spied(model, patch_fn, latent, conds, run=None, sigma=0.6):
    """One model call of `patch_fn(model with an inner spy)` wrapped by an outer spy."""
    inner = Spy()
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = inner
    m = patch_fn(m)
    outer = Spy(m.model_options["transformer_options"]["optimized_attention_override"])
    m.model_options["transformer_options"]["optimized_attention_override"] = outer
    if run is not None:
        m = with_run(m, run)
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(conds, conds)
    guider.set_cfg(1.0)
    sigmas = torch.tensor([sigma, 0.0])

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        return model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))

    guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(one_call), sigmas, seed=0)
    # The pack wraps the inner override: every attention it computes runs through it.
    assert len(inner.calls) >= len(outer.calls) > 0
    return outer.calls


def plain(q, k, v):
    return explicit(q, k, v, lambda b, h, i, s: softmax(s))


@pytest.mark.parametrize("family", ["flux", "sd35"])
@pytest.mark.parametrize("variant", ["keep_mass", "mean_keys"])
def test_uniform_in_the_model_is_the_explicit_joint_math(family, variant):
    model = tiny_dit.build(family)
    c = tiny_dit.conditioning(family, 1)
    calls = run_spied(model, lambda m: apply_uniform_attention_dit(m, "all", 0.0, 1.0, "all", variant),
                      tiny_dit.latent(), c)
    joint = [call for call in calls if call[0].shape[2] == tiny_dit.TEXT_TOKENS + 64]
    # Flux: 2 double + 2 single blocks; SD3.5: 3 joint blocks (its image-only attention is left alone)
    assert len(joint) == (4 if family == "flux" else 3)
    n_txt = tiny_dit.TEXT_TOKENS
    for q, k, v, got in joint:

        def weights(b, h, i, s):
            if i < n_txt:  # text queries: normal attention
                return softmax(s)
            if variant == "keep_mass":  # the text's mass m, m / T per text token
                p = softmax(s)
                m = sum(p[:n_txt])
                return [m / n_txt] * n_txt + p[n_txt:]
            mean = sum(s[:n_txt]) / n_txt  # every text score replaced by the mean score
            return softmax([mean] * n_txt + s[n_txt:])

        values = v
        if variant == "mean_keys":  # ... and every text value by the mean value (for the image queries)
            img_out = explicit(q[:, :, n_txt:], k, torch.cat([v[:, :, :n_txt].mean(2, keepdim=True).expand(
                -1, -1, n_txt, -1), v[:, :, n_txt:]], 2), lambda b, h, i, s: weights(b, h, i + n_txt, s))
            want = torch.cat([explicit(q[:, :, :n_txt], k, values, weights), img_out], 2)
        else:
            want = explicit(q, k, values, weights)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    others = [call for call in calls if call[0].shape[2] != tiny_dit.TEXT_TOKENS + 64]
    assert len(others) == (0 if family == "flux" else 1)
    for q, k, v, got in others:  # SD3.5's image-only attention: untouched
        torch.testing.assert_close(got, plain(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd35"])
@pytest.mark.parametrize("mode", ["fpe", "masactrl"])
def test_injection_in_the_model_is_the_explicit_joint_math(family, mode):
    """Source row 0, target row 1 of one call (the edit sampler's layout): the target's attention at each
    block is the explicit formula on the source's and the target's inputs; the source's is untouched."""
    model = tiny_dit.build(family)
    c = tiny_dit.conditioning(family, 1)
    two = [[torch.cat([c[0][0], tiny_dit.conditioning(family, 2)[0][0]]),
            dict(c[0][1], pooled_output=c[0][1]["pooled_output"].repeat(2, 1))]]
    lat = tiny_dit.latent(batch=2)
    run = EditRunContext(BranchLayout((SOURCE, TARGET), 1), torch.tensor([1.0, 0.6, 0.0]))
    calls = run_spied(model, lambda m: apply_injection_dit(m, mode, 1.0, 0, 0, "cond_and_uncond", fpe_steps),
                      lat, two, run=run)
    n_txt, n_img = tiny_dit.TEXT_TOKENS, 64
    img = slice(n_txt, n_txt + n_img)
    checked = 0
    for q, k, v, got in calls:
        torch.testing.assert_close(got[:1], plain(q[:1], k[:1], v[:1]), rtol=1e-4, atol=1e-5)  # the source row
        joint = q.shape[2] == n_txt + n_img
        im = img if joint else slice(0, n_img)
        if mode == "masactrl":
            keys, values = k[1].clone(), v[1].clone()
            keys[:, im], values[:, im] = k[0][:, im], v[0][:, im]
            want = explicit(q[1:], keys[None], values[None], lambda b, h, i, s: softmax(s))[0]
        else:
            want = plain(q[1:], k[1:], v[1:])[0]
            for h in range(q.shape[1]):
                for i in range(im.stop - im.start):
                    qi = q[1, h, im.start + i]
                    p_t = softmax([float(qi @ k[1, h, j]) / math.sqrt(q.shape[3]) for j in range(q.shape[2])])
                    m = sum(p_t[j] for j in range(q.shape[2]) if not im.start <= j < im.stop)
                    p_s = softmax([float(q[0, h, im.start + i] @ k[0, h, j]) / math.sqrt(q.shape[3])
                                   for j in range(im.start, im.stop)])
                    o = torch.zeros(v.shape[3], dtype=torch.float64)
                    for j in range(q.shape[2]):
                        if not im.start <= j < im.stop:
                            o += p_t[j] * v[1, h, j]
                    for j, pj in enumerate(p_s):
                        o += (1 - m) * pj * v[1, h, im.start + j]
                    want[h, im.start + i] = o
        torch.testing.assert_close(got[1], want, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == len(calls) and checked >= 3
