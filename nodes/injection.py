from comfy_api.latest import io

from ..attention.injection import MODES, OFFICIAL_ROWS, ROW_CHOICES
from ..engine.injection import apply_injection
from .common import CATEGORY, check_widgets


class SelfAttentionInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_SelfAttentionInjection",
            display_name="Self-Attention Injection (FPE / MasaCtrl)",
            category=f"{CATEGORY}/attention",
            description="Makes the edit sampler's target branch keep the source's layout by reading self-attention "
                        "from the source branch. 'fpe' (Free-Prompt-Editing, arXiv 2403.03431): the target uses the "
                        "source's self-attention map, attention(Q_src, K_src, V_tgt), early in the schedule. "
                        "'masactrl' (mutual self-attention): the target queries the source's keys and values, "
                        "attention(Q_tgt, K_src, V_src), from a given step and layer; with a mask, foreground "
                        "queries read the source's foreground only and background its background. No attention "
                        "map is built. Acts only inside AttnEdit_EditSampler; stock samplers are unaffected.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x, SDXL, Flux.1 or SD3/SD3.5 model to patch (a patched "
                                                "clone is returned). On Flux and SD3 the injection acts on the image "
                                                "tokens of the joint attention; the text tokens stay the target's."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="fpe: replace the target's self-attention map by the source's. "
                                       "masactrl: target queries attend to the source's keys and values."),
                io.Float.Input("fpe_ratio", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="fpe only: inject for the first int(ratio x N) steps. The paper uses 0.8 for "
                                       "real images and 0.4 for generated ones; lower lets the edit change more."),
                io.Float.Input("fpe_max_map_side", default=0.5, min=0.0, max=1.0, step=0.125,
                               tooltip="fpe only: inject in self-attention layers whose map side is at most this "
                                       "fraction of the latent side (0.5 = maps up to 32x32 at 512 px: 11 of SD1.5's "
                                       "16 layers; the same meaning on SDXL at 1024 px). Flux and SD3 have one "
                                       "resolution (the token grid): every block is injected."),
                io.Int.Input("masactrl_start_step", default=4, min=0, max=1000,
                             tooltip="masactrl only: first step with mutual self-attention (MasaCtrl default 4)."),
                io.Int.Input("masactrl_start_layer", default=-1, min=-1, max=200,
                             tooltip="masactrl only: first transformer block (execution order) with mutual "
                                     "self-attention. -1 = auto: the first decoder block at half the latent side or "
                                     "more (= MasaCtrl's layer 10 of 16 on SD1.x/2.x; output block 3 on SDXL); "
                                     "on Flux and SD3 the first block at 10/16 of the depth."),
                io.Combo.Input("injection_rows", options=list(ROW_CHOICES), default=OFFICIAL_ROWS, optional=True,
                               tooltip="Which classifier-free-guidance predictions of the target are changed. "
                                       "official: as each official code (fpe: the conditional one only; masactrl: "
                                       "both, each reading the source's same one). cond: the conditional only. "
                                       "cond_and_uncond: both (what this pack did for fpe before)."),
                io.Mask.Input("masactrl_mask", optional=True,
                              tooltip="masactrl only, MasaCtrl's mask-guided variant: the source's foreground "
                                      "(1 = object). Target foreground queries attend to the source's foreground "
                                      "only, background queries to its background; also the target's foreground "
                                      "unless masactrl_target_mask is given. One mask or one per image."),
                io.Mask.Input("masactrl_target_mask", optional=True,
                              tooltip="masactrl only, with masactrl_mask: the target's foreground where it differs "
                                      "from the source's (e.g. the object moves)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with self-attention injection for the edit sampler.")],
        )

    @classmethod
    def validate_inputs(cls, mode, fpe_ratio, fpe_max_map_side, injection_rows=OFFICIAL_ROWS):
        return check_widgets(cls, mode=mode, fpe_ratio=fpe_ratio, fpe_max_map_side=fpe_max_map_side,
                             injection_rows=injection_rows)

    @classmethod
    def execute(cls, model, mode, fpe_ratio, fpe_max_map_side, masactrl_start_step, masactrl_start_layer,
                injection_rows=OFFICIAL_ROWS, masactrl_mask=None, masactrl_target_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_injection(model, mode, fpe_ratio, fpe_max_map_side, masactrl_start_step,
                                             masactrl_start_layer, rows=injection_rows, masactrl_mask=masactrl_mask,
                                             masactrl_target_mask=masactrl_target_mask))
