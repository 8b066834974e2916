import latent_preview
from comfy_api.latest import io

from ..attention.layout import SOURCE
from ..engine.branches import Branch, sample_branches
from ..engine.inversion import check_latent_fits, invert, inverted_part, schedule
from .common import (
    CATEGORY,
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    Inversion,
    check_conditioning,
    check_socket,
    check_widgets,
    latent_output,
)


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_DDIMInversion",
            display_name="DDIM Inversion",
            category=f"{CATEGORY}/inversion",
            description="Runs deterministic DDIM backwards from an image latent to noise and keeps the whole "
                        "trajectory in an inversion handle: invert once, then reconstruct or edit many times "
                        "(ComfyUI caches this node, so changing only a downstream prompt does not re-run it). "
                        "Put AttnEdit_UniformAttention in front of the model for UAM inversion. The LATENT output "
                        "also works in a stock KSamplerAdvanced (add_noise disabled, same steps and scheduler, cfg 1).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x, SDXL, Flux.1 or SD3/SD3.5 model to invert with (Flux "
                                                "and SD3: the flow ODE run backwards; invert at cfg 1, Flux-dev with "
                                                "the FluxGuidance you edit with in the prompt). "
                                                "Its patches apply (e.g. uniform attention). "
                                                "Connect the model you edit with (after Self-Attention Injection): "
                                                "the inversion then keeps what the edit's source branch reads, and "
                                                "the Edit Sampler replays it instead of running the source."),
                io.Latent.Input("latent", tooltip="The image latent(s) from VAEEncode; a batch is inverted as a batch."),
                io.Conditioning.Input("positive", tooltip="The prompt to invert with. The papers (FPE, UAM) invert "
                                                          "with the empty prompt: CLIPTextEncode with no text."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Only used when cfg is not 1. Inverting at cfg above 1 drifts; "
                                              "keep cfg 1 unless you know why."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance during inversion. 1 (no guidance) reconstructs best."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps of the full schedule (the papers use 50). Edits must use the same."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default=DEFAULT_SCHEDULER,
                               tooltip="ddim_uniform gives DDIM's evenly spaced timesteps, as in the papers."),
                io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to invert: 1 = up to pure noise; 0.5 = only the "
                                       "last half of the steps (SDEdit-style edits, InstDiffEdit's default)."),
            ],
            outputs=[
                io.Latent.Output("noisy_latent", display_name="noisy_latent",
                    tooltip="The latent at the noisiest inverted step."),
                Inversion.Output("inversion", display_name="inversion",
                    tooltip="The trajectory, sigmas and predictions, for AttnEdit_EditSampler "
                                                      "and AttnEdit_InversionReconstruct."),
            ],
        )

    @classmethod
    def validate_inputs(cls, cfg, scheduler, strength):
        # steps stays with the host's own check (an int within [1, 1000]).
        return check_widgets(cls, cfg=cfg, scheduler=scheduler, strength=strength)

    @classmethod
    def execute(cls, model, latent, positive, cfg, steps, scheduler, strength, negative=None) -> io.NodeOutput:
        check_socket(model, "MODEL", "model", "DDIM Inversion")
        samples = latent["samples"]
        check_latent_fits(model, samples)
        check_conditioning(positive, "positive")
        if cfg != 1.0:
            if negative is None:
                raise ValueError("cfg is not 1, so inversion needs a negative conditioning: connect one or set cfg 1")
            check_conditioning(negative, "negative")
        inverted = len(inverted_part(schedule(model, scheduler, steps), strength)) - 1
        callback = latent_preview.prepare_callback(model, inverted)
        noisy, handle = invert(model, samples, positive, negative, cfg, steps, scheduler, strength, callback)
        return io.NodeOutput(latent_output(noisy), handle)


class InversionReconstruct(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_InversionReconstruct",
            display_name="Reconstruct from Inversion",
            category=f"{CATEGORY}/inversion",
            description="Samples back from an inversion handle with DDIM to reproduce the inverted image: the way "
                        "to see how faithful an inversion is (plain DDIM, UAM, cfg). With pin_source the "
                        "trajectory is enforced at every step and the result is the input up to float error.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (same checkpoint as the inversion)."),
                Inversion.Input("inversion", tooltip="From AttnEdit_DDIMInversion."),
                io.Conditioning.Input("positive", tooltip="The prompt to reconstruct with (the inversion's, usually)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (only matters when cfg is not 1)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance; the inversion's cfg reconstructs best (1 by default)."),
                io.Boolean.Input("pin_source", default=False,
                                 tooltip="Replace the latent by the stored trajectory at every step (exact)."),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent",
                                      tooltip="The reconstructed latent; decode it with the VAE.")],
        )

    @classmethod
    def validate_inputs(cls, cfg):
        return check_widgets(cls, cfg=cfg)

    @classmethod
    def execute(cls, model, inversion, positive, negative, cfg, pin_source) -> io.NodeOutput:
        check_socket(model, "MODEL", "model", "Reconstruct from Inversion")
        check_socket(inversion, "ATTN_EDIT_INVERSION", "inversion", "Reconstruct from Inversion")
        inversion.check_model(model)
        check_conditioning(positive, "positive")
        check_conditioning(negative, "negative")
        full = schedule(model, inversion.scheduler, inversion.steps)
        callback = latent_preview.prepare_callback(model, inversion.inverted_steps)
        run = sample_branches(model, [Branch(SOURCE, positive, negative)], cfg, inversion.sigmas, full,
                              inversion.images, trajectory=inversion.latents, pin=(SOURCE,) if pin_source else (),
                              callback=callback, handle=inversion)  # pinned: the trajectory, nothing to run
        return io.NodeOutput(latent_output(run.latents[SOURCE]))
