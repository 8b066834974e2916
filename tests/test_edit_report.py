"""engine/report.py: the Edit Sampler's report names the likely reasons an edit does nothing (its HINT lines)."""

from __future__ import annotations

import torch

from attention_edit.engine.report import NO_CHANGE, EditReport, Injection, add_hints, latent_change

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
    """On a DiT the report cannot read the injections (they live in the attention override): it says so
    instead of claiming there is none."""
    text = report(injections=None).text()
    assert "injection: not reported on this model family" in text and "injection: none" not in text
    assert "injection: none" in report(injections=[]).text()
