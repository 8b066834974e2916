"""AttnEdit_EditPrompts: the edit's prompts typed once, encoded, and carried to the nodes that read their words."""

from comfy_api.latest import io

from .common import CATEGORY, Prompts, PromptTexts, check_socket


def encode(clip, text: str) -> list:
    """CONDITIONING of `text`, exactly as the stock CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class EditPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_EditPrompts",
            display_name="Edit Prompts (typed once)",
            category=f"{CATEGORY}/prompts",
            description="Type the edit's prompts here, once: the source (what the image shows), the target (the "
                        "edited description, or the prompt to generate) and the negative. They are encoded as "
                        "CLIPTextEncode encodes them, and the 'prompts' output carries the texts and the CLIP to "
                        "the nodes that need a prompt's words (Instant Attention Mask, Instant Mask Estimate, "
                        "Attention Regulation), so a change of the target prompt reaches the mask too.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint you sample with."),
                io.String.Input("source", multiline=True, default="",
                                tooltip="What the image shows. Real image with FPE or UAM: leave it empty (the "
                                        "inversion's prompt, so the source can be replayed); generated image: the "
                                        "prompt of the original."),
                io.String.Input("target", multiline=True, default="",
                                tooltip="The edited description (only the words to change differ from the source), "
                                        "or for text-to-image the prompt to generate."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="The negative prompt, shared by every branch (the papers: empty)."),
            ],
            outputs=[
                io.Conditioning.Output("source_cond", display_name="source",
                                       tooltip="The source prompt, encoded: the Edit Sampler's source."),
                io.Conditioning.Output("target_cond", display_name="target",
                                       tooltip="The target prompt, encoded: the Edit Sampler's target (a stock "
                                               "sampler's positive)."),
                io.Conditioning.Output("negative_cond", display_name="negative",
                                       tooltip="The negative prompt, encoded: the Edit Sampler's negative."),
                Prompts.Output("prompts", display_name="prompts",
                               tooltip="The texts and the CLIP, for the mask and regulation nodes' 'prompts' input."),
            ],
        )

    @classmethod
    def execute(cls, clip, source, target, negative) -> io.NodeOutput:
        check_socket(clip, "CLIP", "clip", "Edit Prompts")
        encoded: dict[str, list] = {}
        for text in (source, target, negative):
            if text not in encoded:  # the empty prompt, often both source and negative, is encoded once
                encoded[text] = encode(clip, text)
        return io.NodeOutput(encoded[source], encoded[target], encoded[negative],
                             PromptTexts(clip, source, target, negative))
