"""The host hooks the pack relies on, as the pack calls them: a test here fails when a ComfyUI release
changes one (a renamed or reordered parameter, a key no longer published to attention patches), and the
pack's own registered callables take keyword arguments a later host may add and hand them on.

Run on every host the suite runs on (0.33.0 and 0.3.75 in CI).
"""

import inspect

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention

from attention_edit.engine.patching import transformer_blocks
from attention_edit.nodes.injection import SelfAttentionInjection
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def assert_accepts(fn, positional: tuple[str, ...] = (), keywords: tuple[str, ...] = ()) -> None:
    """`fn` takes these parameters in this order (positional) and by these names (keywords)."""
    names = parameters(fn)
    assert names[:len(positional)] == list(positional), f"{fn.__qualname__}{inspect.signature(fn)}"
    missing = [k for k in keywords if k not in names]
    assert not missing, f"{fn.__qualname__}{inspect.signature(fn)} lacks {missing}"


def test_sampling_entry_points_keep_their_parameters():
    assert_accepts(comfy.samplers.CFGGuider.__init__, ("self", "model_patcher"))
    assert_accepts(comfy.samplers.CFGGuider.set_conds, ("self", "positive", "negative"))
    assert_accepts(comfy.samplers.CFGGuider.set_cfg, ("self", "cfg"))
    assert_accepts(comfy.samplers.CFGGuider.sample, ("self", "noise", "latent_image", "sampler", "sigmas"),
                   ("callback", "disable_pbar", "seed"))
    assert_accepts(comfy.samplers.KSAMPLER.__init__, ("self", "sampler_function"))
    assert_accepts(comfy.samplers.calculate_sigmas, ("model_sampling", "scheduler_name", "steps"))
    assert "ddim_uniform" in comfy.samplers.SCHEDULER_NAMES
    assert_accepts(comfy.sample.prepare_noise, ("latent_image", "seed"))
    assert_accepts(latent_preview.prepare_callback, ("model", "steps"))
    assert_accepts(comfy.model_management.throw_exception_if_processing_interrupted)
    assert_accepts(comfy.model_management.interrupt_current_processing, ("value",))
    assert_accepts(comfy.model_management.intermediate_device)
    assert_accepts(comfy.utils.set_progress_bar_global_hook, ("function",))


def test_model_patcher_hooks_keep_their_parameters():
    mp = comfy.model_patcher.ModelPatcher
    for setter in (mp.set_model_attn1_replace, mp.set_model_attn2_replace):
        assert_accepts(setter, ("self", "patch", "block_name", "number", "transformer_index"))
    assert_accepts(mp.set_model_unet_function_wrapper, ("self", "unet_wrapper_function"))
    assert_accepts(mp.clone, ("self",))
    assert_accepts(mp.get_model_object, ("self", "name"))


def test_the_sampler_function_is_called_as_the_pack_expects():
    """KSAMPLER calls a custom sampler function with (model, x, sigmas) and extra_args/callback/disable."""
    model = tiny.build("sd15")
    seen = {}

    def probe(model_k, x, sigmas, *args, **kwargs):
        seen.update(args=args, kwargs=set(kwargs))
        return x

    guider = comfy.samplers.CFGGuider(model)
    cond = tiny.conditioning("sd15", 1)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    lat = tiny.latent()
    guider.sample(torch.zeros_like(lat), lat, comfy.samplers.KSAMPLER(probe), torch.tensor([1.0, 0.0]),
                  disable_pbar=True, seed=0)
    assert seen["args"] == () and {"extra_args", "callback", "disable"} <= seen["kwargs"]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def calls_seen(request):
    """What the host hands every attn1 and attn2 replace during stock sampling of a tiny model."""
    name = request.param
    model = tiny.build(name).clone()
    seen = {"attn1": [], "attn2": []}

    def recording(kind):
        def replace(*args, **kwargs):
            q, k, v, extra_options = args
            seen[kind].append((len(args), set(kwargs), dict(extra_options)))
            return optimized_attention(q, k, v, extra_options["n_heads"])
        return replace

    for key in transformer_blocks(model):
        model.set_model_attn1_replace(recording("attn1"), *key)
        model.set_model_attn2_replace(recording("attn2"), *key)
    cond = tiny.conditioning(name, 1)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, tiny.conditioning(name, 2))
    guider.set_cfg(7.5)
    lat = tiny.latent()
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 2)
    guider.sample(torch.zeros_like(lat), lat, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0)
    return name, seen, len(transformer_blocks(model))


def test_attention_replaces_get_q_k_v_and_the_options_the_pack_reads(calls_seen):
    name, seen, blocks = calls_seen
    for kind in ("attn1", "attn2"):
        assert len(seen[kind]) == 2 * blocks, f"{name} {kind}: every block, every step"
        for n_args, _, options in seen[kind]:
            assert n_args == 4
            # engine/: heads, map size, block key, cond/uncond chunks, step position
            missing = {"n_heads", "original_shape", "block", "block_index", "cond_or_uncond", "sigmas",
                       "sample_sigmas"} - set(options)
            assert not missing, f"{name} {kind}: extra_options lacks {missing}"
            assert options["block"][0] in ("input", "middle", "output") and isinstance(options["block"][1], int)
            assert sorted(options["cond_or_uncond"]) == [0, 1]


def test_the_packs_patches_take_and_pass_on_keyword_arguments_a_host_may_add():
    from attention_edit.engine.instant_mask import InstantMaskStrategy
    from attention_edit.engine.regulation import TokenPlan, apply_attention_regulation

    base = tiny.build("sd15")
    handed_on = []

    def foreign(q, k, v, extra_options, **kwargs):  # another pack's replace under ours
        handed_on.append(kwargs)
        return optimized_attention(q, k, v, extra_options["n_heads"])

    keys = transformer_blocks(base)
    under = base.clone()
    for key in keys:
        under.set_model_attn1_replace(foreign, *key)
        under.set_model_attn2_replace(foreign, *key)
    models = {
        "uniform": UniformAttention.execute(model=under, scope="inversion_and_aux", start_percent=0.0, end_percent=1.0,
                                            blocks="all").args[0],
        "injection": SelfAttentionInjection.execute(model=under, mode="fpe", fpe_ratio=0.8, fpe_max_map_side=1.0,
                                                    masactrl_start_step=4, masactrl_start_layer=-1).args[0],
        "regulation": apply_attention_regulation(under, TokenPlan.from_positions([[2]], end=5), blocks="all",
                                                 map_side=1.0),
        "instant mask": InstantMaskStrategy([[1]], [1]).prepare(under),
    }
    q = torch.randn(2, 256, 32)
    k = v = torch.randn(2, 77, 32)
    checked = set()
    for label, model in models.items():
        replaces = model.model_options["transformer_options"]["patches_replace"]
        for kind in ("attn1", "attn2"):
            for key in keys:
                patch = replaces[kind][key]
                if patch is foreign:
                    continue
                options = {"n_heads": 2, "original_shape": [2, 4, 16, 16], "block": key[:2], "block_index": key[2],
                           "cond_or_uncond": [0, 1]}  # no step position, no branch layout: every patch hands on
                handed_on.clear()
                patch(q, k, v, options, future_option=3)
                assert handed_on == [{"future_option": 3}], f"{label} {kind} {key}"
                checked.add(label)
    assert checked == set(models)
