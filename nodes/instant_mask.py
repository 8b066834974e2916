"""AttnEdit_InstantMask: InstDiffEdit's instant attention mask for the Edit Sampler."""

from comfy_api.latest import io

from ..engine.instant_mask import InstantMaskStrategy
from ..engine.tokens import parse_words, prompt_word_positions, word_positions
from .common import CATEGORY, MaskStrategy, check_widgets


class InstantMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_InstantMask",
            display_name="Instant Attention Mask (InstDiffEdit)",
            category=f"{CATEGORY}/masks",
            description="InstDiffEdit's instant mask (arXiv 2401.07709) for AttnEdit_EditSampler: made on the fly from "
                        "the target branch's own cross-attention at low resolution, no extra passes. Each step the "
                        "edited latent outside the mask is replaced by the source (the inversion trajectory), so the "
                        "unedited region comes back exactly. For InstDiffEdit's SDEdit-style start, invert with "
                        "strength 0.5.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP that encoded the target prompt: used to find its words."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The target prompt's text, exactly as given to its CLIPTextEncode."),
                io.String.Input("words", default="",
                                tooltip="Optional: the word(s) to edit, comma-separated (e.g. 'cat' or 'red "
                                        "car'). Empty: objects are found through the start token's map."),
                io.Float.Input("map_side", default=0.25, min=0.03125, max=1.0, step=0.03125,
                               tooltip="Capture layers whose map side is this fraction of the latent side (0.25 = "
                                       "16x16 maps at 512 px, down and up blocks, as in the paper)."),
                io.Float.Input("object_similarity", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Words whose map has at least this cosine similarity to the inverted "
                                       "start-token map count as object."),
                io.Float.Input("background_similarity", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Words at most this similar count as background and are subtracted."),
                io.Int.Input("blur_passes", default=2, min=0, max=8,
                             tooltip="Passes of a 5x5 Gaussian blur over the mask (the paper uses 2)."),
                io.Float.Input("threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold phi on the normalised map: 0.2 (the paper) leaves a margin "
                                       "around the object; raise it for a tighter mask."),
            ],
            outputs=[MaskStrategy.Output("mask_strategy", display_name="mask_strategy",
                                         tooltip="Connect to AttnEdit_EditSampler's mask_strategy.")],
        )

    @classmethod
    def validate_inputs(cls, map_side, object_similarity, background_similarity, threshold):
        return check_widgets(cls, map_side=map_side, object_similarity=object_similarity,
                             background_similarity=background_similarity, threshold=threshold)

    @classmethod
    def execute(cls, clip, target_prompt, words, map_side, object_similarity, background_similarity, blur_passes,
                threshold) -> io.NodeOutput:
        if not target_prompt.strip():
            raise ValueError("target_prompt is empty: paste the target prompt's text")
        groups = prompt_word_positions(clip, target_prompt)
        named = parse_words(words)
        edit_words = None
        if named:
            positions = word_positions(clip, target_prompt, named)
            for p in positions:
                if p not in groups:
                    groups.append(p)
            edit_words = [groups.index(p) for p in positions]
        return io.NodeOutput(InstantMaskStrategy(groups, edit_words, map_side, object_similarity,
                                                 background_similarity, blur_passes, threshold))
