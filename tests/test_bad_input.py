"""Bad input is refused before any compute, in the pack's own words (node, input, fix), and nothing is
silently wrong: one test group per class of the HTTP fuzz's findings. The same classes over the live
host's HTTP API are in tests/host/test_host_bad_input.py and test_host_graphs.py.
"""

import inspect

import pytest
import torch
from test_attention_control import STEPS, edit, inject, invert, uniform
from test_regulation import clip_for

from attention_edit.engine.regulation import find_target_tokens
from attention_edit.nodes import NODES
from attention_edit.nodes.adaptive_mask import AdaptiveMask
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.instant_mask import InstantMask
from attention_edit.nodes.inversion import DDIMInversion
from fixtures import tiny


def widgets(node):
    """(display name, {input: schema input}) for the node's number and choice widgets."""
    from comfy_api.latest import io

    schema = node.define_schema()
    kinds = (io.Float.Input, io.Int.Input, io.Combo.Input, io.String.Input, io.Boolean.Input)
    return schema.display_name, {i.id: i for i in schema.inputs if isinstance(i, kinds)}


def validate(node, **overrides):
    """The node's validate_inputs as the host calls it: its parameters, from the schema defaults."""
    _, inputs = widgets(node)
    params = [p for p in inspect.signature(node.validate_inputs).parameters]
    return node.validate_inputs(**{p: overrides.get(p, inputs[p].default) for p in params})


def _of_kind(kind: str, validated_only: bool = False) -> list:
    from comfy_api.latest import io

    cls = getattr(io, kind).Input
    return [(n, name) for n in VALIDATING for name, i in widgets(n)[1].items() if isinstance(i, cls)
            and (not validated_only or name in inspect.signature(n.validate_inputs).parameters)]


VALIDATING = [n for n in NODES if "validate_inputs" in vars(n)]
FLOATS = _of_kind("Float")
COMBOS = _of_kind("Combo", validated_only=True)


def _id(pair):
    return f"{pair[0].__name__}.{pair[1]}"


@pytest.mark.parametrize("node", VALIDATING, ids=lambda n: n.__name__)
def test_defaults_validate(node):
    assert validate(node) is True


@pytest.mark.parametrize("pair", FLOATS, ids=_id)
def test_every_number_input_refuses_nan_and_infinity(pair):
    node, name = pair
    assert name in inspect.signature(node.validate_inputs).parameters, "the host's range check lets NaN through"
    display, _ = widgets(node)
    for bad in (float("nan"), float("inf"), -float("inf")):
        message = validate(node, **{name: bad})
        assert message is not True and message.startswith(f"{display}: {name} is ") and "finite" in message


@pytest.mark.parametrize("pair", FLOATS, ids=_id)
def test_every_number_input_refuses_values_outside_its_range(pair):
    node, name = pair
    spec = widgets(node)[1][name]
    for bad in (spec.min - 1.0, spec.max + 1.0):
        message = validate(node, **{name: bad})
        assert message is not True and f"{name} is {bad}, outside [{spec.min}, {spec.max}]" in message


@pytest.mark.parametrize("pair", COMBOS, ids=_id)
def test_every_choice_is_checked_at_validation(pair):
    node, name = pair
    message = validate(node, **{name: "bogus"})
    assert message is not True and "'bogus'" in message and name.split('_')[0] in message.lower()


@pytest.mark.parametrize("node", VALIDATING, ids=lambda n: n.__name__)
def test_int_widgets_keep_the_hosts_own_range_check(node):
    """An input a node's validate_inputs takes loses the host's min/max check (steps=1001 ran for minutes)."""
    from comfy_api.latest import io

    ints = {i.id for i in node.define_schema().inputs if isinstance(i, io.Int.Input)}
    assert not ints & set(inspect.signature(node.validate_inputs).parameters)


def test_a_batch_with_the_adaptive_mask_and_a_pinned_source_edits_every_image():
    name = "sd15"
    model = uniform(tiny.build(name), scope="inversion_and_aux")
    lat = torch.cat([tiny.latent(seed=s) for s in (1, 2, 3)])
    empty, tgt = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    _, handle = invert(model, lat, empty)
    strategy = AdaptiveMask.execute(lambda_max=0.5, t_mask=1000.0, dilation="edit_region", blend_source=False,
                                    recipe="uniform_pinned").args[0]
    out = EditSampler.execute(model=inject(model, "masactrl"), source=empty, target=tgt, negative=empty, cfg=7.5,
                              steps=STEPS, scheduler="ddim_uniform", pin_source=True, seed=0, inversion=handle,
                              mask_strategy=strategy).args
    edited, source, mask = out[0]["samples"], out[1]["samples"], out[2]
    assert edited.shape == lat.shape and mask.shape == (3, 128, 128)
    assert (source - lat).abs().max() <= 1e-4  # every image's source pinned to its own trajectory
    assert 0 < float(mask.mean()) < 1 and torch.isfinite(edited).all()


def test_area_and_mask_conditioning_are_refused_before_the_inversion_runs():
    name = "sd15"
    model, empty, tgt = tiny.build(name), tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    inputs = dict(model=model, source=empty, negative=empty, cfg=7.5, steps=STEPS, scheduler="ddim_uniform",
                  pin_source=True, seed=0, inversion=None)
    # The host asks a node with lazy inputs what it needs once the others are evaluated: the inversion,
    # for good prompts; for a bad one, the error, before the inversion node has run.
    assert EditSampler.check_lazy_status(target=tgt, **inputs) == ["inversion"]
    for extra in ({"area": (8, 8, 0, 0), "strength": 1.0}, {"mask": torch.ones(1, 16, 16)}):
        regional = [[tgt[0][0], dict(tgt[0][1], **extra)]]
        with pytest.raises(ValueError, match="'target' has (area|mask) conditioning"):
            EditSampler.check_lazy_status(target=regional, **inputs)
    nan = [[torch.full_like(tgt[0][0], float("nan")), {}]]
    with pytest.raises(ValueError, match="'target' contains NaN"):
        EditSampler.check_lazy_status(target=nan, **inputs)


def test_the_inversion_handle_refuses_another_model_and_says_what_differs():
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    name = "sd15"
    model, lat = tiny.build(name), tiny.latent()
    empty, tgt = tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    _, handle = invert(model, lat, empty)
    middle = "diffusion_model.middle_block.1.proj_in.weight"  # a middle layer, not the first or last conv
    lora = model.clone()
    lora.add_patches({middle: (torch.full_like(model.model.state_dict()[middle], 0.01),)}, 1.0)
    other = tiny.build(name)
    with torch.no_grad():  # another checkpoint, the same but for one middle layer
        other.model.diffusion_model.middle_block[1].proj_in.weight.add_(0.01)
    cases = {
        "weight patches": lora,
        "the checkpoint": other,
        "model sampling": ModelSamplingDiscrete().patch(model, "v_prediction", False)[0],
    }
    cases["weight patches (merge)"] = ModelMergeSimple().merge(model, other, 0.5)[0]
    for what, changed in cases.items():
        with pytest.raises(ValueError, match=what.split(" (")[0]):
            edit(changed, empty, tgt, empty, handle=handle)
    # This pack's attention patches on clones of the inverted model are the intended use.
    edit(inject(uniform(model, scope="inversion_and_aux"), "fpe"), empty, tgt, empty, handle=handle)


def test_other_prediction_changing_options_recompute_the_source_and_say_so():
    from attention_edit.attention.layout import SOURCE
    from attention_edit.engine.branches import Branch, sample_branches
    from attention_edit.engine.inversion import schedule

    name = "sd15"
    base = inject(tiny.build(name), "fpe")
    lat, empty, tgt = tiny.latent(), tiny.conditioning(name, 1), tiny.conditioning(name, 3)
    _, handle = invert(base, lat, empty)
    freeu_like = base.clone()
    freeu_like.set_model_output_block_patch(lambda h, hsp, transformer_options: (h * 1.1, hsp))
    handle.check_model(freeu_like)  # the same weights and sampling: the trajectory is still this model's
    full = schedule(freeu_like, "ddim_uniform", STEPS)
    run = sample_branches(freeu_like, [Branch(SOURCE, empty, empty), Branch("target", tgt, empty)], 7.5,
                          handle.sigmas, full, 1, trajectory=handle.latents, pin=(SOURCE,), handle=handle)
    assert run.info["replayed"] == () and "model options" in run.info["recomputed"][SOURCE]


def test_latents_that_are_no_image_latent_are_refused():
    model, empty = tiny.build("sd15"), tiny.conditioning("sd15", 1)
    for samples, message in ((torch.full((1, 4, 16, 16), 1e30), "far beyond an image latent"),
                             (torch.zeros(1, 4, 0, 0), "the latent is empty"),
                             (torch.zeros(0, 4, 16, 16), "the latent is empty")):
        with pytest.raises(ValueError, match=message):
            invert(model, samples, empty)


def test_a_literal_where_a_connection_belongs_is_named():
    empty = tiny.conditioning("sd15", 1)
    with pytest.raises(ValueError, match="'model' must be connected to a MODEL output, got str"):
        DDIMInversion.execute(model="abc", latent={"samples": tiny.latent()}, positive=empty, cfg=1.0, steps=STEPS,
                              scheduler="ddim_uniform", strength=1.0)
    with pytest.raises(ValueError, match="'target' must be connected to a CONDITIONING output"):
        EditSampler.check_lazy_status(model=tiny.build("sd15"), source=empty, target="a cat", negative=empty)


def test_a_word_past_the_first_77_tokens_is_named_as_such():
    clip = clip_for("sd15")
    prompt = "a photo of " + "a very " * 40 + "zebra"
    with pytest.raises(ValueError, match="'zebra' comes after the prompt's first 77 tokens"):
        InstantMask.execute(clip=clip, target_prompt=prompt, words="zebra", map_side=0.25, object_similarity=0.9,
                            background_similarity=0.6, blur_passes=2, threshold=0.2)


def test_unicode_words_are_listed_as_written():
    clip = clip_for("sd15")
    with pytest.raises(ValueError, match="words: ein, großer, Hund"):
        find_target_tokens(clip, "ein großer Hund", "Katze")
