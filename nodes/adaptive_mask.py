"""AttnEdit_AdaptiveMask: UAM's adaptive mask blending for the Edit Sampler."""

from comfy_api.latest import io

from ..attention.masks import DILATE_EDIT, DILATIONS
from ..engine.adaptive_mask import AdaptiveMaskStrategy
from .common import CATEGORY, MaskStrategy, check_widgets


class AdaptiveMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_AdaptiveMask",
            display_name="Adaptive Edit Mask (UAM)",
            category=f"{CATEGORY}/masks",
            description="UAM's adaptive mask blending (arXiv 2411.19652) for AttnEdit_EditSampler. In the last steps "
                        "(t < T_mask) the edit region is where the target's x0 prediction differs most from the "
                        "source's (above a quantile rising from 0 to lambda), dilated 3x3; outside it the target "
                        "takes the x0 of an auxiliary uniform-attention reconstruction branch, so the background "
                        "stays. The sampler adds that branch (source prompt, no cfg); put AttnEdit_UniformAttention "
                        "with scope 'inversion_and_aux' on the model so it uses uniform attention.",
            inputs=[
                io.Float.Input("lambda_max", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Final quantile lambda: at the last step the top (1 - lambda) of the "
                                       "differences count as the edit region (UAM default 0.5). Lower = larger mask."),
                io.Float.Input("t_mask", default=200.0, min=0.0, max=1000.0, step=10.0,
                               tooltip="Blend only while the timestep is below this (of 1000; UAM default 200, "
                                       "about the last 10 of 50 steps)."),
                io.Combo.Input("dilation", options=list(DILATIONS), default=DILATE_EDIT,
                               tooltip="edit_region: dilate the edit region (the official code). unchanged_region: "
                                       "dilate the kept region instead (the paper's Algorithm 1)."),
                io.Boolean.Input("blend_source", default=False,
                                 tooltip="Also blend the source branch's x0 with the auxiliary one outside the edit "
                                         "(the paper's red line). No effect when the source is pinned."),
            ],
            outputs=[MaskStrategy.Output("mask_strategy", display_name="mask_strategy",
                                         tooltip="Connect to AttnEdit_EditSampler's mask_strategy.")],
        )

    @classmethod
    def validate_inputs(cls, lambda_max, t_mask, dilation):
        return check_widgets(cls, lambda_max=lambda_max, t_mask=t_mask, dilation=dilation)

    @classmethod
    def execute(cls, lambda_max, t_mask, dilation, blend_source) -> io.NodeOutput:
        return io.NodeOutput(AdaptiveMaskStrategy(lambda_max, t_mask, dilation, blend_source))
