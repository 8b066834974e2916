
import logging

import comfy.sample
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..attention.layout import AUX, SOURCE, TARGET
from ..engine import report as edit_report
from ..engine.adaptive_mask import AdaptiveMaskStrategy
from ..engine.branches import Branch, sample_branches
from ..engine.conditioning import conditioning_key
from ..engine.dit import dit_family
from ..engine.instant_mask import InstantMaskStrategy
from ..engine.inversion import check_latent_fits, schedule
from ..engine.masks import FixedMaskStrategy
from ..engine.uniform import uniform_branches, uses_uniform_attention
from .common import (
    CATEGORY,
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    Inversion,
    MaskStrategy,
    check_conditioning,
    check_socket,
    check_widgets,
    image_mask,
    latent_output,
)

log = logging.getLogger("attention_edit")


class EditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_EditSampler",
            display_name="Edit Sampler (source + target branches)",
            category=f"{CATEGORY}/sampling",
            description="Runs the source branch (the original prompt) and the target branch (the edited prompt) "
                        "together, one batched model call per step, with DDIM. The attention patches on the model "
                        "(self-attention injection, uniform attention) read the branch layout this node publishes. "
                        "Real image: connect an inversion; the source is pinned to its trajectory, so it is "
                        "reconstructed exactly; when the inversion was made with this patched model and the "
                        "source prompt is the inversion's, the source is replayed from what the inversion kept "
                        "instead of run (same result, the cost of one generation; the log says which). "
                        "Generated image: connect a latent (EmptyLatentImage) and a seed; "
                        "both branches start from the same noise. UAM (AttnEdit_AdaptiveMask, official recipe): "
                        "a third, auxiliary branch starts from aux_inversion, a second inversion made with "
                        "uniform attention; nothing is pinned. After each run the node shows its edit report: which "
                        "branches ran or were replayed, where the injection read the source, the mask's coverage, "
                        "how far the target moved from the source, and hints when the edit is likely to do "
                        "nothing.",
            inputs=[
                io.Model.Input("model", tooltip="The model, patched with AttnEdit_SelfAttentionInjection and/or "
                                                "AttnEdit_UniformAttention."),
                io.Conditioning.Input("source", tooltip="The source prompt: what the image shows (for a real image, "
                                                        "usually the inversion's prompt)."),
                io.Conditioning.Input("target", tooltip="The target prompt: the edited description."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, shared by both branches."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance for both branches (the papers use 7.5)."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps. With an inversion it must equal the inversion's steps."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default=DEFAULT_SCHEDULER,
                               tooltip="With an inversion it must equal the inversion's scheduler."),
                io.Boolean.Input("pin_source", default=True,
                                 tooltip="Real images: replace the source branch by the inversion trajectory at every "
                                         "step (exact source reconstruction, as FPE and DirectInversion do). UAM's "
                                         "official recipe (Adaptive Mask, two_trajectories) never pins."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Generated images: the noise both branches start from."),
                # lazy: the prompts and masks are checked (check_lazy_status) before the inversion is run.
                Inversion.Input("inversion", optional=True, lazy=True,
                                tooltip="Real image: the handle from AttnEdit_DDIMInversion."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Generated image: the latent size and batch (EmptyLatentImage). "
                                        "Ignored when an inversion is connected."),
                MaskStrategy.Input("mask_strategy", optional=True,
                                   tooltip="How the edit is confined: AttnEdit_InstantMask (InstDiffEdit) or "
                                           "AttnEdit_AdaptiveMask (UAM). Without one the whole image may change."),
                io.Mask.Input("edit_mask", optional=True,
                              tooltip="Any ComfyUI MASK (1 = may change): outside it the edited image keeps the "
                                      "source exactly at every step. Used when no mask_strategy is connected."),
                Inversion.Input("aux_inversion", optional=True, lazy=True,
                                tooltip="UAM (Adaptive Mask, recipe two_trajectories): a second DDIM Inversion of "
                                        "the same image, made with AttnEdit_UniformAttention on its model: the "
                                        "auxiliary branch starts from it, source and target from 'inversion' "
                                        "(made with normal attention). Only run when that recipe needs it."),
            ],
            outputs=[
                io.Latent.Output("edited_latent", display_name="edited_latent",
                    tooltip="The target branch: the edited image latent."),
                io.Latent.Output("source_latent", display_name="source_latent",
                    tooltip="The source branch: the reconstruction or original generation."),
                io.Mask.Output("mask", display_name="mask",
                    tooltip="The final edit mask at image resolution (all ones without a mask). To keep the rest "
                            "of a photo pixel for pixel, lay the decoded edit over the loaded image through it "
                            "(Image Composite Masked)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, cfg, scheduler):
        return check_widgets(cls, cfg=cfg, scheduler=scheduler)

    @classmethod
    def check_lazy_status(cls, **inputs):
        # Every other input has been evaluated: refuse bad prompts and masks before the inversions run.
        cls.check_inputs(**{k: v for k, v in inputs.items() if k not in ("inversion", "aux_inversion")})
        real = "inversion" in inputs
        check_recipe(inputs.get("mask_strategy"), real, "aux_inversion" in inputs)
        needed = ["inversion"] if real and inputs["inversion"] is None else []
        if real and uses_aux_inversion(inputs.get("mask_strategy")) and inputs.get("aux_inversion", 0) is None:
            needed.append("aux_inversion")
        return needed

    @classmethod
    def check_inputs(cls, model, source, target, negative, mask_strategy=None, edit_mask=None, **_):
        check_socket(model, "MODEL", "model", "Edit Sampler")
        for cond, name in ((source, "source"), (target, "target"), (negative, "negative")):
            check_conditioning(cond, name)
        if mask_strategy is not None and not hasattr(mask_strategy, "prepare"):
            raise ValueError("Edit Sampler: 'mask_strategy' must be connected to an Instant or Adaptive Mask node")
        if edit_mask is not None and (not isinstance(edit_mask, torch.Tensor) or not torch.isfinite(edit_mask).all()):
            raise ValueError("Edit Sampler: 'edit_mask' must be a finite MASK (values 0 to 1)")

    @classmethod
    def execute(cls, model, source, target, negative, cfg, steps, scheduler, pin_source, seed,
                inversion=None, latent=None, mask_strategy=None, edit_mask=None, aux_inversion=None) -> io.NodeOutput:
        cls.check_inputs(model, source, target, negative, mask_strategy, edit_mask)
        check_recipe(mask_strategy, inversion is not None, aux_inversion is not None)
        branches = [Branch(SOURCE, source, negative), Branch(TARGET, target, negative)]
        strategy = mask_strategy
        if strategy is None and edit_mask is not None:
            strategy = FixedMaskStrategy(edit_mask)
        if strategy is not None:
            model = strategy.prepare(model)
        two_trajectories = inversion is not None and uses_aux_inversion(strategy)
        if strategy is not None and strategy.needs_aux:
            # UAM's auxiliary reconstruction, unguided (its own prompt as the negative: cfg is a no-op). Official
            # recipe: the unconditional prompt (the official code's, the negative here: the empty prompt of
            # the paper); the pinned recipe: the source prompt, the inversion's, so that it is replayed.
            aux_prompt = negative if two_trajectories else source
            branches.append(Branch(AUX, aux_prompt, aux_prompt))
        warnings = warn_about_uniform_attention(model, strategy)
        if inversion is not None:
            check_socket(inversion, "ATTN_EDIT_INVERSION", "inversion", "Edit Sampler")
            inversion.check_model(model)
            inversion.check_steps(steps)
            if scheduler != inversion.scheduler:
                raise ValueError(f"the inversion used the '{inversion.scheduler}' scheduler but '{scheduler}' was "
                                 f"asked for: use the same scheduler")
            full = schedule(model, scheduler, steps)
            images = inversion.images
            callback = latent_preview.prepare_callback(model, inversion.inverted_steps)
            # Pinned: the source, and UAM's auxiliary reconstruction (exact, and so replayable).
            pin, starts = ((SOURCE, AUX) if pin_source else ()), None
            if two_trajectories:  # UAM's official recipe: the auxiliary branch from its own inversion, no pinning
                warnings += check_aux_inversion(inversion, aux_inversion, model, steps, scheduler)
                pin, starts = (), {AUX: aux_inversion.latents[0]}
                if pin_source:
                    log.info("edit: UAM's two-trajectory recipe does not pin the source branch (pin_source has no "
                             "effect; the Adaptive Mask's recipe uniform_pinned does)")
            elif aux_inversion is not None:
                warnings.append(_warn("aux_inversion is not used: only the Adaptive Mask's two_trajectories recipe "
                                      "starts a branch from it"))
            run = sample_branches(model, branches, cfg, inversion.sigmas, full, images, trajectory=inversion.latents,
                                  pin=pin, strategy=strategy, callback=callback, handle=inversion, starts=starts)
            report_replay(run)
            run_steps, pinned = inversion.inverted_steps, tuple(b for b in pin if b in run.latents)
        elif latent is not None:
            samples = latent["samples"]
            check_latent_fits(model, samples)
            full = schedule(model, scheduler, steps)
            noise = comfy.sample.prepare_noise(samples, seed)
            callback = latent_preview.prepare_callback(model, steps)
            run = sample_branches(model, branches, cfg, full, full, samples.shape[0], noise=noise, strategy=strategy,
                                  callback=callback)
            run_steps, pinned = steps, ()
        else:
            raise ValueError("connect an inversion (real image) or a latent such as EmptyLatentImage (generated image)")
        edited = run.latents[TARGET]
        # The schedule's own step count (ddim_uniform may give one more than asked)
        report = build_report(model, run, strategy, source, target, cfg, len(full) - 1, run_steps,
                              inversion is not None, pinned, warnings)
        text = report.text()
        log.info("edit: %s", text.replace("\n", "\n  "))
        return io.NodeOutput(latent_output(edited), latent_output(run.latents[SOURCE]), image_mask(edited, run.mask),
                             ui=ui.PreviewText(text))


def _warn(message: str) -> str:
    log.warning("edit: %s", message)
    return message


def mask_kind(strategy) -> str | None:
    if strategy is None:
        return None
    if isinstance(strategy, InstantMaskStrategy):
        return "instant mask (InstDiffEdit)"
    if isinstance(strategy, AdaptiveMaskStrategy):
        return f"adaptive mask (UAM, {strategy.recipe})"
    if isinstance(strategy, FixedMaskStrategy):
        return "edit_mask (a given MASK)"
    return type(strategy).__name__


def build_report(model, run, strategy, source, target, cfg: float, steps: int, run_steps: int, real_image: bool,
                 pinned: tuple, warnings: list[str]) -> edit_report.EditReport:
    """What the edit did, from the model's patches, the run and its latents (engine/report.py)."""
    flow = dit_family(model) is not None  # the same sigma-space step: DDIM for eps models, Euler on a flow's path
    report = edit_report.EditReport(steps=steps, run_steps=run_steps, cfg=cfg, real_image=real_image, pinned=pinned,
                                    warnings=list(warnings), sampler="Euler, rectified flow" if flow else "DDIM")
    edit_report.branch_facts(report, run)
    report.injections = edit_report.find_injections(model, steps, run_steps)
    report.uniform = tuple(uniform_branches(model, report.branches))
    edit_report.mask_facts(report, run, mask_kind(strategy), getattr(strategy, "word_names", None))
    report.moved, report.changed_area = edit_report.latent_change(run.latents[TARGET], run.latents[SOURCE])
    report.same_prompts = conditioning_key(source) == conditioning_key(target)
    edit_report.add_hints(report)
    return report


def uses_aux_inversion(strategy) -> bool:
    """Whether the mask strategy is UAM's adaptive mask in its official recipe (an aux branch of its own)."""
    return strategy is not None and getattr(strategy, "needs_aux", False) and getattr(strategy, "two_trajectories",
                                                                                    False)


def check_recipe(strategy, real_image: bool, aux_connected: bool) -> None:
    if real_image and uses_aux_inversion(strategy) and not aux_connected:
        raise ValueError("Edit Sampler: the Adaptive Mask's recipe two_trajectories (UAM's official code) starts the "
                         "auxiliary branch from a uniform-attention inversion: connect 'aux_inversion' to a second "
                         "DDIM Inversion of the image whose model has AttnEdit_UniformAttention (and invert "
                         "'inversion' with the model before it), or set the Adaptive Mask's recipe to "
                         "uniform_pinned for one pinned uniform-attention inversion")


def check_aux_inversion(inversion, aux, model, steps: int, scheduler: str) -> list[str]:
    """The auxiliary inversion must be of the same image, model and schedule as the main one; returns the
    warnings (logged too) about how the two inversions were made."""
    check_socket(aux, "ATTN_EDIT_INVERSION", "aux_inversion", "Edit Sampler")
    aux.check_model(model)
    aux.check_steps(steps)
    if aux.scheduler != scheduler:
        raise ValueError(f"the aux_inversion used the '{aux.scheduler}' scheduler but '{scheduler}' was asked for: "
                         f"use the same scheduler")
    if aux.sigmas.shape != inversion.sigmas.shape or not torch.equal(aux.sigmas, inversion.sigmas):
        raise ValueError("the aux_inversion covers another part of the schedule than the inversion: give both "
                         "DDIM Inversions the same steps, scheduler and strength")
    if aux.latent_shape != inversion.latent_shape:
        raise ValueError(f"the aux_inversion is of latents of shape {aux.latent_shape} but the inversion of "
                         f"{inversion.latent_shape}: invert the same image(s) twice")
    warnings = []
    if not uses_uniform_attention(kept_signature(aux)):
        warnings.append(_warn("the aux_inversion was made without uniform attention: UAM's auxiliary branch starts "
                              "from a uniform-attention inversion (put AttnEdit_UniformAttention on its DDIM "
                              "Inversion's model)"))
    if uses_uniform_attention(kept_signature(inversion)):
        warnings.append(_warn("the inversion was made with uniform attention: in UAM's official recipe source and "
                              "target start from a normal-attention inversion (invert with the model before "
                              "AttnEdit_UniformAttention)"))
    return warnings


def kept_signature(handle) -> tuple:
    """The attention signature of the model an inversion was made with (what its inversion rows computed)."""
    return getattr(getattr(handle, "record", None), "attention_signature", ())


def warn_about_uniform_attention(model, strategy) -> list[str]:
    """Uniform attention on the source and target rows makes the edit ignore the prompts' content: say so, in
    the log and (the returned messages) in the edit report."""
    warnings = []
    edited = uniform_branches(model, (SOURCE, TARGET))
    if edited:
        warnings.append(_warn(f"the model's Uniform Cross-Attention covers the {' and '.join(edited)} branch (scope "
                              f"'all'): their images ignore what the prompts say, so the edit is uniform. Give the "
                              f"Edit Sampler a model with scope 'inversion_and_aux' (uniform attention only in the "
                              f"inversion and the auxiliary branch)"))
    if strategy is not None and getattr(strategy, "needs_aux", False) and not uniform_branches(model, (AUX,)):
        warnings.append(_warn("the Adaptive Mask's auxiliary branch runs with normal attention: put "
                              "AttnEdit_UniformAttention (scope 'inversion_and_aux') on the Edit Sampler's model"))
    return warnings


def report_replay(run) -> None:
    """Say which branches the edit replayed from the inversion and why others were recomputed."""
    replayed = run.info.get("replayed", ())
    if replayed:
        log.info("edit: replayed the %s branch from the inversion instead of running it", " and ".join(replayed))
    if run.info.get("unused"):
        log.info("edit: the pinned source branch is read by nothing (no injection, no adaptive mask): not run")
    for branch, reason in run.info.get("recomputed", {}).items():
        log.info("edit: the %s branch was recomputed, not replayed: %s", branch, reason)
