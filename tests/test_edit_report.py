"""engine/report.py: the Edit Sampler's report names the likely reasons an edit does nothing (its HINT lines)."""

from __future__ import annotations

import pytest
import torch

from attention_edit.engine.report import NO_CHANGE, EditReport, Injection, add_hints, find_injections, latent_change
from attention_edit.nodes.edit_sampler import EditSampler
from attention_edit.nodes.injection import SelfAttentionInjection
from attention_edit.nodes.inversion import DDIMInversion
from attention_edit.nodes.uniform_attention import UniformAttention
from fixtures import tiny_dit

RUN = list(range(10))


def report(**facts) -> EditReport:
    base = dict(steps=10, run_steps=10, cfg=7.5, real_image=True, branches=("source", "target"),
                ran=("target",), replayed=("source",), moved=0.3, changed_area=0.2)
    base.update(facts)
    r = EditReport(**base)
    add_hints(r)
    return r


def hints(**facts) -> list[str]:
    return report(**facts).hints


def fpe(active, layers_active=4) -> Injection:
    return Injection("fpe", layers=4, of_layers=8, active_steps=list(active), run_steps=RUN,
                     layers_active=layers_active)


def test_an_edit_that_moved_has_no_hints():
    r = report(injections=[fpe(range(8))], mask_kind="instant mask (InstDiffEdit)", mask_coverage=0.3)
    assert r.hints == []
    text = r.text()
    assert text.startswith("Edit report") and "no warnings" in text and "HINT" not in text
    assert "injection: fpe at 4 of 8 layers, steps 0-7 (8 of 10)" in text
    assert "mask: instant mask (InstDiffEdit), covers 30.0% of the image" in text


def test_fpe_at_every_step_is_a_likely_no_op():
    found = hints(injections=[fpe(RUN)])
    assert len(found) == 1 and "FPE injects at every step" in found[0] and "fpe_ratio" in found[0]
    assert "HINT: FPE injects at every step" in report(injections=[fpe(RUN)]).text()
    assert hints(injections=[fpe(RUN[:-1])]) == []  # one step left free: not flagged


def test_masactrl_from_the_first_step_at_every_layer():
    every = Injection("masactrl", layers=8, of_layers=8, active_steps=RUN, run_steps=RUN, layers_active=8)
    assert any("MasaCtrl reads the source from the first step" in h for h in hints(injections=[every]))
    late = Injection("masactrl", layers=8, of_layers=8, active_steps=RUN[4:], run_steps=RUN, layers_active=8)
    assert hints(injections=[late]) == []


def test_an_injection_active_at_no_step():
    idle = Injection("fpe", layers=4, of_layers=8, active_steps=[], run_steps=RUN, layers_active=0)
    assert any("active at no step" in h for h in hints(injections=[idle]))
    assert "injection: fpe at 0 of 8 layers, no step of 10" in report(injections=[idle]).text()


def test_mask_of_zero_area_never_applied_or_everything():
    kind = "instant mask (InstDiffEdit)"
    assert any("zero area" in h for h in hints(mask_kind=kind, mask_coverage=0.0))
    assert any("never applied" in h for h in hints(mask_kind=kind, mask_coverage=None))
    assert any("whole image" in h for h in hints(mask_kind=kind, mask_coverage=1.0))
    assert hints(mask_kind=kind, mask_coverage=0.4) == []
    assert hints(mask_kind=None) == []  # no mask: nothing to say about one


def test_same_prompts_and_an_edit_that_did_not_move():
    assert any("source and target prompts are the same" in h for h in hints(same_prompts=True))
    still = hints(moved=NO_CHANGE / 2)
    assert len(still) == 1 and "almost the source" in still[0] and "target prompt" in still[0]
    # With a likelier reason already given, the closing hint only states the fact.
    both = hints(moved=NO_CHANGE / 2, injections=[fpe(RUN)])
    assert len(both) == 2 and both[1].startswith("the edited image is almost the source") and "check" not in both[1]


def test_latent_change_measures_distance_and_area():
    source = torch.ones(1, 4, 8, 8)
    assert latent_change(source.clone(), source) == (0.0, 0.0)
    target = source.clone()
    target[..., :2, :] += 1.0  # a quarter of the pixels changed by the source's magnitude
    moved, area = latent_change(target, source)
    assert abs(area - 0.25) < 1e-9
    assert abs(moved - (target - source).norm().item() / source.norm().item()) < 1e-9


def test_injections_not_read_on_a_family_are_not_reported_as_none():
    """Where the report cannot read the injections (a model of no supported kind) it says so instead of
    claiming there is none."""
    text = report(injections=None).text()
    assert "injection: not reported on this model family" in text and "injection: none" not in text
    assert "injection: none" in report(injections=[]).text()


DIT_STEPS = 10


def dit_injected(name, mode, **settings):
    args = dict(fpe_ratio=0.8, fpe_max_map_side=0.5, masactrl_start_step=4, masactrl_start_layer=-1)
    args.update(settings)
    return SelfAttentionInjection.execute(model=tiny_dit.build(name), mode=mode, **args).args[0]


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_dit_injections_are_read_from_the_attention_override(name):
    """On Flux and SD3.5 the injections are DitAttentionPatches in the attention-override chain: the report
    names the method, the blocks (kind and index) and the steps, as on the UNet."""
    every = [("double", 0), ("double", 1), ("single", 0), ("single", 1)] if name == "flux" else \
        [("double", 0), ("double", 1), ("double", 2)]
    # FPE: every block, steps [0, int(0.8 * 10)) = 0-7
    (fpe_found,) = find_injections(dit_injected(name, "fpe"), DIT_STEPS, DIT_STEPS)
    assert fpe_found == Injection("fpe", layers=len(every), of_layers=len(every), active_steps=list(range(8)),
                                  run_steps=list(range(DIT_STEPS)), layers_active=len(every), blocks=tuple(every))
    # MasaCtrl's default: the first block at 10/16 of the depth or deeper (Flux: order 3 of 4 = single 1;
    # SD3.5: order 2 of 3 = joint block 2), from step 4
    (masa,) = find_injections(dit_injected(name, "masactrl"), DIT_STEPS, DIT_STEPS)
    assert masa == Injection("masactrl", layers=1, of_layers=len(every), active_steps=list(range(4, DIT_STEPS)),
                             run_steps=list(range(DIT_STEPS)), layers_active=1, blocks=(every[-1],))
    # an inversion at strength 0.5: the run is the last 5 steps of the schedule
    (late,) = find_injections(dit_injected(name, "masactrl", masactrl_start_layer=1), DIT_STEPS, 5)
    assert late.blocks == tuple(every[1:]) and late.active_steps == list(range(5, 10)) and late.run_steps == \
        list(range(5, 10))
    text = report(injections=[fpe_found, masa]).text()
    where = "double 0-1, single 0-1" if name == "flux" else "double 0-2"
    assert f"injection: fpe at {len(every)} of {len(every)} blocks ({where}), steps 0-7 (8 of 10)" in text
    last = "single 1" if name == "flux" else "double 2"
    assert f"injection: masactrl at 1 of {len(every)} blocks ({last}), steps 4-9 (6 of 10)" in text
    assert "not reported" not in text


def test_dit_uniform_attention_and_other_overrides_are_no_injection():
    """Uniform attention is reported on its own line, not as an injection; two injections stacked on one
    model are two entries (the innermost, applied first, first)."""
    m = UniformAttention.execute(model=tiny_dit.build("flux"), scope="inversion_and_aux", start_percent=0.0,
                                 end_percent=1.0, blocks="all").args[0]
    assert find_injections(m, DIT_STEPS, DIT_STEPS) == []
    assert find_injections(tiny_dit.build("flux"), DIT_STEPS, DIT_STEPS) == []
    both = SelfAttentionInjection.execute(model=dit_injected("flux", "fpe", fpe_ratio=0.3), mode="masactrl",
                                          fpe_ratio=0.8, fpe_max_map_side=0.5, masactrl_start_step=0,
                                          masactrl_start_layer=0).args[0]
    fpe_found, masa = find_injections(both, DIT_STEPS, DIT_STEPS)
    assert (fpe_found.method, fpe_found.active_steps) == ("fpe", [0, 1, 2])
    assert (masa.method, masa.layers_active, masa.active_steps) == ("masactrl", 4, RUN)
    assert any("MasaCtrl reads the source from the first step" in h for h in hints(injections=[masa]))


def test_edit_sampler_reports_the_dit_injections_and_uniform_attention():
    """The Edit Sampler's report on tiny Flux: FPE's blocks and steps, and the branches uniform attention
    covers (scope all: both)."""
    lat, src, tgt = tiny_dit.latent(), tiny_dit.conditioning("flux", 1), tiny_dit.conditioning("flux", 3)
    base = tiny_dit.build("flux")
    uam = UniformAttention.execute(model=base, scope="all", start_percent=0.0, end_percent=1.0,
                                   blocks="all").args[0]
    handle = DDIMInversion.execute(model=uam, latent={"samples": lat}, positive=src, negative=None, cfg=1.0,
                                   steps=4, scheduler="simple", strength=1.0).args[1]
    model = SelfAttentionInjection.execute(model=uam, mode="fpe", fpe_ratio=0.5, fpe_max_map_side=0.5,
                                           masactrl_start_step=4, masactrl_start_layer=-1).args[0]
    out = EditSampler.execute(model=model, source=src, target=tgt, negative=src, cfg=1.0, steps=4, scheduler="simple",
                              pin_source=True, seed=0, inversion=handle)
    text = "".join(out.ui["text"]) if isinstance(out.ui, dict) else "".join(out.ui.as_dict()["text"])
    assert "injection: fpe at 4 of 4 blocks (double 0-1, single 0-1), steps 0-1 (2 of 4)" in text
    assert "not reported" not in text and "injection: none" not in text
    assert "uniform cross-attention: source, target" in text
