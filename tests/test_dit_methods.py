"""The DiT patch layer (one attention override, block tags, token layout) and the methods on tiny Flux and
SD3.5 through the host's samplers and the pack's nodes."""

import comfy.samplers
import nodes as comfy_nodes
import pytest
import torch

from attention_edit.attention.layout import SOURCE, TARGET
from attention_edit.engine.branches import Branch, sample_branches
from attention_edit.engine.dit import OVERRIDE_KEY, DitAttentionPatch, add_dit_attention, dit_patches
from attention_edit.engine.dit_methods import apply_uniform_attention_dit
from attention_edit.engine.inversion import schedule
from attention_edit.nodes.injection import SelfAttentionInjection
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny, tiny_dit

DITS = ("flux", "sd35")


def ksample(model, family, steps=3):
    c = tiny_dit.conditioning(family, 1)
    (out,) = comfy_nodes.KSampler().sample(model, 0, steps, 1.0, "euler", "simple", c, c,
                                           {"samples": tiny_dit.latent()}, 1.0)
    return out["samples"]


def predict(model, x, sigma, c):
    """One model call's x0 at sigma through the host's guider (wrappers and patches applied)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(c, c)
    guider.set_cfg(1.0)
    got = {}

    def one(model_k, xx, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        got["x0"] = model_k(x.to(xx), sigmas[0] * xx.new_ones([x.shape[0]]), **(extra_args or {}))
        return xx

    guider.sample(torch.zeros_like(x), torch.zeros_like(x), comfy.samplers.KSAMPLER(one), torch.tensor([sigma, 0.0]),
                  seed=0)
    return got["x0"]


@pytest.mark.parametrize("family", DITS)
def test_blocks_and_tokens_each_call_sees(family):
    """Every attention call is tagged with its block in execution order and its text / image tokens; on a
    host that publishes block_type / block_index (0.33.0 Flux) they agree with the tag."""
    model = tiny_dit.build(family)
    seen = []

    def spy(call, q, k, v, previous, source):
        seen.append((call.dit_block.kind, call.dit_block.index, call.joint, call.txt, call.img,
                     call.options.get("block_type"), call.options.get("block_index")))
        return previous(q, k, v)

    m = model.clone()
    add_dit_attention(m, "spy", spy)
    torch.testing.assert_close(ksample(m, family, steps=1), ksample(model, family, steps=1), rtol=0, atol=0)
    t, img = slice(0, tiny_dit.TEXT_TOKENS), slice(tiny_dit.TEXT_TOKENS, tiny_dit.TEXT_TOKENS + 64)
    if family == "flux":
        want = [("double", 0, True), ("double", 1, True), ("single", 0, True), ("single", 1, True)]
    else:  # SD3.5 medium-like: block 0 has a second, image-only attention
        want = [("double", 0, True), ("double", 0, False), ("double", 1, True), ("double", 2, True)]
    assert [s[:3] for s in seen] == want
    for kind, index, joint, txt, im, host_kind, host_index in seen:
        assert (txt, im) == ((t, img) if joint else (slice(0, 0), slice(0, 64)))
        if host_kind is not None:
            assert (host_kind, host_index) == (kind, index)


@pytest.mark.parametrize("family", DITS)
def test_an_override_already_set_is_wrapped_and_still_runs(family):
    """Another pack's attention override and its dit block replace keep working under the pack's."""
    model = tiny_dit.build(family)
    calls, blocks = [], []

    def foreign(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs) * 1.01  # a visible effect of its own

    def foreign_block(args, extra):
        blocks.append(1)
        return extra["original_block"](args)

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = foreign
    m.set_model_patch_replace(foreign_block, "dit", "double_block", 1)
    with_foreign = ksample(m, family, steps=1)
    n_calls, n_blocks = len(calls), len(blocks)
    p = m.clone()
    add_dit_attention(p, "identity", lambda call, q, k, v, previous, source: previous(q, k, v))
    assert p.model_options["transformer_options"][OVERRIDE_KEY].previous is foreign
    calls.clear()
    blocks.clear()
    torch.testing.assert_close(ksample(p, family, steps=1), with_foreign, rtol=0, atol=0)
    assert (len(calls), len(blocks)) == (n_calls, n_blocks) and n_calls > 0 and n_blocks == 1


def test_patches_chain_outermost_first_and_clones_share_them():
    model = tiny_dit.build("flux")
    a = apply_uniform_attention_dit(model, "all", 0.0, 0.5, "double")
    b = SelfAttentionInjection.execute(model=a, mode="fpe", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                       masactrl_start_step=4, masactrl_start_layer=-1).args[0]
    assert [p.method for p in dit_patches(b)] == ["injection:fpe", "uniform"]
    assert dit_patches(b.clone())[0] is dit_patches(b)[0]
    assert dit_patches(model) == [] and isinstance(b.model_options["transformer_options"][OVERRIDE_KEY],
                                                   DitAttentionPatch)


@pytest.mark.parametrize("family", DITS)
def test_stock_samplers_are_unaffected_by_uams_wiring_and_by_injection(family):
    model = tiny_dit.build(family)
    stock = ksample(model, family)
    uam = UniformAttention.execute(model=model, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                   blocks="all").args[0]
    inj = SelfAttentionInjection.execute(model=uam, mode="masactrl", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                         masactrl_start_step=0, masactrl_start_layer=0).args[0]
    torch.testing.assert_close(ksample(inj, family), stock, rtol=0, atol=0)
    everywhere = UniformAttention.execute(model=model, scope="all", start_percent=0.0, end_percent=1.0,
                                          blocks="all").args[0]
    assert float((ksample(everywhere, family) - stock).abs().max()) > 0


@pytest.mark.parametrize("family", DITS)
def test_uniform_mean_keys_removes_more_of_the_prompt(family):
    """The measurement behind the DiT default (engine/dit_methods.DEFAULT_UNIFORM_VARIANT): how much of the
    prediction's dependence on the prompt's tokens each variant removes, for how large a change."""
    model = tiny_dit.build(family)
    variants = {v: apply_uniform_attention_dit(model, "all", 0.0, 1.0, "all", v) for v in ("keep_mass", "mean_keys")}
    removed, moved = {v: [] for v in variants}, {v: [] for v in variants}
    for seed in range(3):
        x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
        c1, c2 = tiny_dit.conditioning(family, 10 + seed), tiny_dit.conditioning(family, 20 + seed)
        c2 = [[c2[0][0], c1[0][1]]]  # the same pooled vector and guidance: only the tokens differ
        base1, base2 = predict(model, x, 0.6, c1), predict(model, x, 0.6, c2)
        dependence = float((base1 - base2).abs().mean())
        for v, m in variants.items():
            p1, p2 = predict(m, x, 0.6, c1), predict(m, x, 0.6, c2)
            removed[v].append(1 - float((p1 - p2).abs().mean()) / dependence)
            moved[v].append(float((p1 - base1).abs().mean()) / dependence)
    for v in variants:
        assert min(removed[v]) > 0, f"{family} {v}: removes {removed[v]} of the prompt dependence"
    assert min(removed["mean_keys"]) > max(removed["keep_mass"]), removed
    assert max(moved["mean_keys"]) < 1.5 * min(moved["keep_mass"]), moved  # for a similar change


def edit(model, handle, positive, target, family):
    full = schedule(model, handle.scheduler, handle.steps)
    return sample_branches(model, [Branch(SOURCE, positive, positive), Branch(TARGET, target, target)], 1.0,
                           handle.sigmas, full, handle.images, trajectory=handle.latents, pin=(SOURCE,), handle=handle)


@pytest.mark.parametrize("family", DITS)
@pytest.mark.parametrize("mode", ["fpe", "masactrl"])
def test_injection_keeps_the_source_and_replays_it_exactly(family, mode):
    """With injection the target stays closer to the source image than a plain edit; an edit that replays
    the source from the inversion computes what one running the source live computes."""
    model = tiny_dit.build(family)
    lat = tiny_dit.latent()
    c, target = tiny_dit.conditioning(family, 1), tiny_dit.conditioning(family, 7)
    inj = SelfAttentionInjection.execute(model=model, mode=mode, fpe_ratio=0.8, fpe_max_map_side=0.5,
                                         masactrl_start_step=1, masactrl_start_layer=-1).args[0]
    _, plain_handle = DDIMInversion.execute(model=model, latent={"samples": lat}, positive=c, negative=None, cfg=1.0,
                                            steps=8, scheduler="simple", strength=1.0).args
    _, handle = DDIMInversion.execute(model=inj, latent={"samples": lat}, positive=c, negative=None, cfg=1.0,
                                      steps=8, scheduler="simple", strength=1.0).args
    replayed = edit(inj, handle, c, target, family)
    assert replayed.info["replayed"] == (SOURCE,), replayed.info
    live = edit(inj, plain_handle, c, target, family)  # no record: the source runs in the same batch
    assert SOURCE not in live.info["replayed"]
    plain = edit(model, plain_handle, c, target, family)
    effect = replayed.latents[TARGET] - plain.latents[TARGET]
    tiny.assert_same_computation(replayed.latents[TARGET], live.latents[TARGET], effect=effect)
    d_inj = float((replayed.latents[TARGET] - lat).pow(2).mean())
    d_plain = float((plain.latents[TARGET] - lat).pow(2).mean())
    assert d_inj < d_plain, f"{family} {mode}: injected target {d_inj:.4g} from the source, plain {d_plain:.4g}"


def test_methods_not_done_on_dits_are_refused_by_name():
    model = tiny_dit.build("flux")
    mask = torch.ones(1, 16, 16)
    with pytest.raises(ValueError, match="mask-guided MasaCtrl.*Flux and SD3"):
        SelfAttentionInjection.execute(model=model, mode="masactrl", fpe_ratio=0.8, fpe_max_map_side=0.5,
                                       masactrl_start_step=4, masactrl_start_layer=-1, masactrl_mask=mask)
