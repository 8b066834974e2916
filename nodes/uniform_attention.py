from comfy_api.latest import io

from ..attention.dit_blocks import parse_dit_block_spec
from ..engine.uniform import SCOPE_INVERSION_AND_AUX, SCOPES, apply_uniform_attention
from .common import CATEGORY, block_spec_error, check_widgets


def any_block_spec_error(blocks: str) -> bool | str:
    """A UNet block spec (input/middle/output) or a DiT one (double/single/depth); the model decides which
    applies when the node runs."""
    unet = block_spec_error(blocks)
    if unet is True:
        return True
    try:
        parse_dit_block_spec(blocks)
    except ValueError as e:
        return f"{unet} (UNets); {e} (Flux, SD3)"
    return True


class UniformAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_UniformAttention",
            display_name="Uniform Cross-Attention (UAM)",
            category=f"{CATEGORY}/attention",
            description="Replaces cross-attention probabilities by 1/T over the T text tokens, i.e. the output "
                        "becomes the mean of V over tokens (UAM, arXiv 2411.19652). Used for inversion it removes "
                        "the prompt dependence that makes DDIM inversion drift, so reconstruction is closer. "
                        "Cheaper than normal attention: no scores, no softmax.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x, SDXL, Flux.1 or SD3/SD3.5 model to patch (a patched "
                                                "clone is returned). On Flux and SD3 the image tokens' attention to "
                                                "the text tokens of the joint attention is made uniform."),
                io.Combo.Input("scope", options=list(SCOPES), default=SCOPE_INVERSION_AND_AUX,
                               tooltip="'inversion_and_aux' (UAM's wiring): only DDIM Inversion and the Edit "
                                       "Sampler's auxiliary reconstruction branch; the source and target branches "
                                       "keep normal attention, and stock samplers are unaffected. 'all': every row "
                                       "of every model call, in any sampler: only for a model that just inverts or "
                                       "reconstructs (the Edit Sampler warns when its source and target get it)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where uniform attention starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where it stops (1 = through the last step)."),
                io.String.Input("blocks", default="all",
                                tooltip="Which blocks: 'all', or on UNets a comma list of input, middle, output with "
                                        "optional numbers, e.g. 'input:7-8, middle, output:3-5'; on Flux and SD3 "
                                        "double, single (optionally numbered, 'double:0-3') or a fraction of the "
                                        "depth, 'depth:0.5-1'."),
            ],
            outputs=[io.Model.Output(tooltip="The model with uniform cross-attention.")],
        )

    @classmethod
    def validate_inputs(cls, scope, start_percent, end_percent, blocks):
        checked = check_widgets(cls, scope=scope, start_percent=start_percent, end_percent=end_percent)
        if checked is not True:
            return checked
        if not start_percent < end_percent:
            return f"start_percent ({start_percent}) must be below end_percent ({end_percent})"
        return any_block_spec_error(blocks)

    @classmethod
    def execute(cls, model, scope, start_percent, end_percent, blocks) -> io.NodeOutput:
        return io.NodeOutput(apply_uniform_attention(model, scope, start_percent, end_percent, blocks))
