from comfy_api.latest import io

from ..attention.regulation import RESTORES, RegulationParams
from ..engine.dit_regulation import DEFAULT_DIT_BLOCKS, regulation_blocks_dit, regulation_token_keys
from ..engine.patching import UNET, model_family
from ..engine.regulation import (
    DEFAULT_BLOCKS,
    DEFAULT_MAP_SIDE,
    apply_attention_regulation,
    find_target_tokens,
    regulation_layers,
)
from .common import CATEGORY, Prompts, check_widgets, prompt_from
from .uniform_attention import any_block_spec_error

DEFAULTS = RegulationParams()


class AttentionRegulation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_AttentionRegulation",
            display_name="Attention Regulation",
            category=f"{CATEGORY}/attention",
            description="Makes text-to-image follow the prompt's named objects (\"a cat and a dog\" drawing only "
                        "the cat) without training (attention regulation, arXiv 2403.06381). In a few "
                        "low-resolution cross-attention layers, early in the schedule and on the positive prompt "
                        "only, a smooth bias is added to the target words' attention scores, optimised each step "
                        "so that every target gets a high-attention region and an equal share of attention. "
                        "Works with the stock KSampler and SamplerCustom on SD1.x, SD2.x and SDXL, and on SD3 / "
                        "SD3.5 and Flux.1, where the image tokens' attention to the prompt inside the joint "
                        "attention is regulated (its share of the text kept, image-to-image attention untouched).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x, SDXL, SD3 / SD3.5 or Flux.1 model to patch (a "
                                                "patched clone is returned)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP that encodes the positive prompt: its tokenizer finds the target "
                                      "words' token positions. Not needed when 'prompts' is connected."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt, exactly as typed in the CLIPTextEncode that feeds the "
                                        "sampler's positive input. Leave it empty and connect 'prompts' "
                                        "(AttnEdit_EditPrompts, whose target feeds the sampler's positive) to type "
                                        "the prompt only once."),
                io.String.Input("target_words", default="",
                                tooltip="Comma-separated words or phrases of the prompt to regulate, e.g. 'cat, dog'. "
                                        "Each is one target (all of its tokens, every occurrence). Empty: the model "
                                        "is returned unchanged. A word not in the prompt stops the node with the "
                                        "prompt's word list."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Regulate steps i < end_percent x N (the paper: 25 of 50 steps)."),
                io.Int.Input("iterations", default=DEFAULTS.iterations, min=0, max=200,
                             tooltip="Gradient-descent steps per layer and step (paper: 20), from random weights "
                                     "(seeded per layer and step). The iterate of lowest loss is kept. 0 = no bias."),
                io.Float.Input("learning_rate", default=DEFAULTS.learning_rate, min=0.0, max=10000.0, step=1.0,
                               tooltip="Gradient-descent step size on the bump weights (paper: 100)."),
                io.Float.Input("ema", default=DEFAULTS.ema, min=0.0, max=1.0, step=0.01,
                               tooltip="Weight of the previous step's optimum in the moving average "
                                       "(S = ema x S_best,prev + (1 - ema) x S_best; official: 0.25)."),
                io.Float.Input("decay", default=DEFAULTS.decay, min=0.0, max=1.0, step=0.001,
                               tooltip="The bias applied at step i is decay^i x S (paper: 0.99)."),
                io.Float.Input("peak_target", default=DEFAULTS.peak_target, min=0.0, max=1.0, step=0.01,
                               tooltip="The value each target map's 90th percentile should reach (paper: 0.9)."),
                io.Float.Input("share_weight", default=DEFAULTS.share_weight, min=0.0, max=10000.0, step=1.0,
                               tooltip="Weight of the equal-share term: each target's mean attention pulled to "
                                       "min(1, 0.2 n) / n (official code: 80)."),
                io.Float.Input("beta", default=DEFAULTS.beta, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the penalty on the bias weights, mean(w^2), which keeps the edit "
                                       "small (official code: 0.09; the paper rounds it to 0.1)."),
                io.String.Input("blocks", default=DEFAULT_BLOCKS,
                                tooltip="UNet blocks to consider: 'all', or a comma list of input, middle, output "
                                        "with optional numbers. Default: the encoder and decoder (the paper's last "
                                        "down and first up block, with map_side). On SD3 / SD3.5 and Flux: 'all', "
                                        "double, single (with numbers, e.g. 'double:4-8') or depth:a-b (fraction of the depth); "
                                        f"the default here means '{DEFAULT_DIT_BLOCKS}', the part of the depth "
                                        "where the paper's layers sit in SD's UNet."),
                io.Float.Input("map_side", default=DEFAULT_MAP_SIDE, min=0.0, max=1.0, step=0.125,
                               tooltip="Regulate the layers of those blocks whose maps are this fraction of the "
                                       "latent side (nearest power of two): 0.25 = 16x16 maps on SD at 512 px and "
                                       "32x32 on SDXL at 1024 px. 0 = every size (slow). Not used on SD3 / "
                                       "SD3.5 and Flux (every joint attention is at the latent side / 2)."),
                io.Combo.Input("restore", options=list(RESTORES), default=DEFAULTS.restore, optional=True,
                               tooltip="Start and end tokens after the softmax get back their unbiased probability. "
                                       "overwrite (official): nothing else changes, the targets keep their "
                                       "regulated probability. renormalise: the other tokens are rescaled so every "
                                       "row sums to one (what this node did before)."),
                Prompts.Input("prompts", optional=True,
                              tooltip="The prompts from AttnEdit_EditPrompts: the regulated prompt is its target "
                                      "(the one its target output gives the sampler's positive), found with its "
                                      "CLIP; leave 'prompt' empty."),
            ],
            outputs=[io.Model.Output(tooltip="The model with attention regulation, for any sampler.")],
        )

    @classmethod
    def validate_inputs(cls, blocks, end_percent, learning_rate, ema, decay, peak_target, share_weight, beta,
                        map_side, restore=DEFAULTS.restore):
        checked = check_widgets(cls, end_percent=end_percent, learning_rate=learning_rate, ema=ema, decay=decay,
                                peak_target=peak_target, share_weight=share_weight, beta=beta, map_side=map_side,
                                restore=restore)
        return checked if checked is not True else any_block_spec_error(blocks)

    @classmethod
    def execute(cls, model, prompt, target_words, end_percent, iterations, learning_rate, ema, decay,
                peak_target, share_weight, beta, blocks, map_side, restore=DEFAULTS.restore, clip=None,
                prompts=None) -> io.NodeOutput:
        family = model_family(model)  # unsupported families first, then bad words and layers: before sampling
        clip, prompt = prompt_from(prompts, clip, prompt, "prompt", "Attention Regulation")
        keys = regulation_token_keys(family, clip) if family != UNET else None
        if family == UNET:
            plan = find_target_tokens(clip, prompt, target_words)
            regulation_layers(model, blocks, map_side)
        else:  # SD3: among the CLIP-L / CLIP-G tokens (its first text tokens); Flux: among T5's tokens
            plan = find_target_tokens(clip, prompt, target_words, keys=keys)
            regulation_blocks_dit(model, blocks)
        params = RegulationParams(iterations=iterations, learning_rate=learning_rate, ema=ema, decay=decay,
                                  peak_target=peak_target, share_weight=share_weight, beta=beta, restore=restore)
        return io.NodeOutput(apply_attention_regulation(model, plan, end_percent, params, blocks, map_side))
