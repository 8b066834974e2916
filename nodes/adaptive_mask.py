"""AttnEdit_AdaptiveMask: UAM's adaptive mask blending for the Edit Sampler."""

from comfy_api.latest import io

from ..attention.masks import DILATE_EDIT, DILATIONS
from ..engine.adaptive_mask import RECIPE_TWO_TRAJECTORIES, RECIPES, AdaptiveMaskStrategy
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
                        "source's (above twice a quantile rising from 0 to lambda), dilated 3x3; outside it the target "
                        "takes the x0 of an auxiliary uniform-attention reconstruction branch, so the background "
                        "stays, and inside it the source takes the auxiliary x0 (the paper's red line). The sampler "
                        "adds that branch; put AttnEdit_UniformAttention (scope 'inversion_and_aux') on the model. "
                        "Official recipe (two_trajectories): source and target start from a normal-attention "
                        "inversion, the auxiliary branch from a uniform-attention one (the Edit Sampler's "
                        "aux_inversion).",
            inputs=[
                io.Float.Input("lambda_max", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Final quantile lambda (UAM default 0.5): the edit region is where the "
                                       "difference exceeds twice its q-quantile, q rising from 0 to lambda over the "
                                       "steps (the official soft threshold). Lower = larger mask."),
                io.Float.Input("t_mask", default=200.0, min=0.0, max=1000.0, step=10.0,
                               tooltip="Blend only while the timestep is below this (of 1000; UAM default 200, "
                                       "about the last 10 of 50 steps)."),
                io.Combo.Input("dilation", options=list(DILATIONS), default=DILATE_EDIT,
                               tooltip="edit_region: dilate the edit region (the official code). unchanged_region: "
                                       "dilate the kept region instead (the paper's Algorithm 1)."),
                io.Boolean.Input("blend_source", default=True,
                                 tooltip="The paper's red line (on in the official code): inside the edit region the "
                                         "source branch takes the auxiliary branch's x0. No effect when the source "
                                         "is pinned (recipe uniform_pinned)."),
                io.Combo.Input("recipe", options=list(RECIPES), default=RECIPE_TWO_TRAJECTORIES, optional=True,
                               tooltip="two_trajectories (the official code): source and target start from the "
                                       "Edit Sampler's inversion (normal attention), the auxiliary branch "
                                       "(negative prompt, no cfg) from its aux_inversion (uniform attention); "
                                       "nothing is pinned. uniform_pinned (this pack's earlier recipe): one "
                                       "uniform-attention inversion for every branch, source and auxiliary branch "
                                       "(source prompt) pinned to it: exact and replayable, one inversion."),
            ],
            outputs=[MaskStrategy.Output("mask_strategy", display_name="mask_strategy",
                                         tooltip="Connect to AttnEdit_EditSampler's mask_strategy.")],
        )

    @classmethod
    def validate_inputs(cls, lambda_max, t_mask, dilation, recipe=RECIPE_TWO_TRAJECTORIES):
        return check_widgets(cls, lambda_max=lambda_max, t_mask=t_mask, dilation=dilation, recipe=recipe)

    @classmethod
    def execute(cls, lambda_max, t_mask, dilation, blend_source, recipe=RECIPE_TWO_TRAJECTORIES) -> io.NodeOutput:
        return io.NodeOutput(AdaptiveMaskStrategy(lambda_max, t_mask, dilation, blend_source, recipe))
