"""AttnEdit_InstantMask: InstDiffEdit's instant attention mask for the Edit Sampler (the pack's on-the-fly
variant; the paper's own SDEdit-style estimation is AttnEdit_InstantMaskEstimate)."""

from comfy_api.latest import io

from ..engine.instant_mask import InstantMaskStrategy, WordGroups
from ..engine.tokens import T5, parse_words, prompt_word_table, tokenized, word_positions
from .common import CATEGORY, MaskStrategy, Prompts, check_widgets, prompt_from

START_MAPS = ["inverted", "direct"]  # how the start token's map finds the index word (inverted: the paper)


def prompt_word_groups(clip, target_prompt: str, words: str) -> tuple[list[list[int]], list[int] | None]:
    """Token positions of every word of the prompt, and the indices among them of the user's named words
    (None when none is named); a clear error for an empty prompt or a word not in it."""
    groups, named, _ = named_word_groups(clip, target_prompt, words)
    return groups, named


def named_word_groups(clip, target_prompt: str, words: str, key: str | None = None
                      ) -> tuple[list[list[int]], list[int] | None, list[str]]:
    """prompt_word_groups, and the word (or phrase) each group stands for, in tokenizer `key`'s tokens (the
    default: the first CLIP-style tokenizer's)."""
    if not target_prompt.strip():
        raise ValueError("target_prompt is empty: paste the target prompt's text, or connect 'prompts' from "
                         "AttnEdit_EditPrompts")
    table = prompt_word_table(clip, target_prompt, key)
    groups, names = [p for _, p in table], [w for w, _ in table]
    named = parse_words(words)
    if not named:
        if not groups:
            raise ValueError(f"no word of \"{target_prompt}\" was found among its first 77 tokens")
        return groups, None, names
    positions = word_positions(clip, target_prompt, named, key)
    for word, p in zip(named, positions):
        if p not in groups:
            groups.append(p)  # a phrase: its tokens merged into one more map
            names.append(word)
    return groups, [groups.index(p) for p in positions], names


def t5_word_groups(clip, target_prompt: str, words: str) -> WordGroups | str | None:
    """The words among T5's tokens (what Flux.1's context holds), for the instant mask on Flux: None where the
    CLIP has no start-less 't5xxl' tokenizer (a CLIP-prompted Flux, such as the toy flow world: its context is
    the CLIP tokens, start token first), the reason as a str where a word is not found there (raised only if
    the model is Flux)."""
    tp = tokenized(clip, "", None).get(T5)
    if tp is None or tp.start is not None:
        return None
    try:
        return WordGroups(*named_word_groups(clip, target_prompt, words, T5))
    except ValueError as error:
        return str(error)


def word_inputs() -> list:
    """The inputs both instant-mask nodes share, in this order."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="The CLIP that encoded the target prompt: used to find its words. Not needed when "
                              "'prompts' is connected."),
        io.String.Input("target_prompt", multiline=True, default="",
                        tooltip="The target prompt's text, exactly as given to its CLIPTextEncode. Leave it empty "
                                "and connect 'prompts' (AttnEdit_EditPrompts) to type the prompt only once."),
        io.String.Input("words", default="",
                        tooltip="Optional: the word(s) to edit, comma-separated (e.g. 'cat' or 'red car'); they "
                                "take the place of the index word. Empty (the paper): the index word is the "
                                "word whose map is most similar to the inverted start-token map."),
    ]


def prompts_input() -> io.Input:
    return Prompts.Input("prompts", optional=True,
                         tooltip="The prompts from AttnEdit_EditPrompts: the mask reads its target text and CLIP, "
                                 "so the prompt is typed once (leave target_prompt empty).")


def rule_inputs() -> list:
    return [
        io.Float.Input("map_side", default=0.25, min=0.03125, max=1.0, step=0.03125,
                       tooltip="Capture layers whose map side is this fraction of the latent side (0.25 = "
                               "16x16 maps at 512 px, down and up blocks, as in the paper). On small latents (32x32 "
                               "and below) 0.5 with threshold 0.05 fits the object better (toy world at "
                               "256 px: IoU 0.62 against 0.49), though it did not edit more often there."),
        io.Float.Input("object_similarity", default=0.9, min=0.0, max=1.0, step=0.01,
                       tooltip="Words whose map has at least this cosine similarity to the index word's map "
                               "count as object (the paper: 0.9)."),
        io.Float.Input("background_similarity", default=0.6, min=0.0, max=1.0, step=0.01,
                       tooltip="Words at most this similar to the index word count as background and are "
                               "subtracted (the paper: 0.6)."),
        io.Int.Input("blur_passes", default=2, min=0, max=8,
                     tooltip="Passes of a 5x5 Gaussian blur over the refined map (the paper uses 2)."),
        io.Float.Input("threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                       tooltip="Threshold phi on the normalised map: 0.2 (the paper) leaves a margin "
                               "around the object; raise it for a tighter mask, lower it (0.05) with map_side 0.5 "
                               "for a mask that grows with the object."),
    ]


def start_map_input() -> io.Combo.Input:
    return io.Combo.Input("start_map", options=START_MAPS, default="inverted", optional=True,
                          tooltip="How the start token's map finds the index word when no word is named. "
                                  "inverted (the paper): SD's start token attends to the background, so its "
                                  "inverse marks the object. direct: for models whose start token attends to "
                                  "the object (the pack's toy-world model does).")


class InstantMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnEdit_InstantMask",
            display_name="Instant Attention Mask (InstDiffEdit)",
            category=f"{CATEGORY}/masks",
            description="The pack's on-the-fly variant of InstDiffEdit's instant mask (arXiv 2401.07709) for "
                        "AttnEdit_EditSampler: made from the target branch's own cross-attention while the edit "
                        "runs from a DDIM inversion, with the paper's mask rule. Each step the edited latent "
                        "outside the mask is replaced by the source (the inversion trajectory), and the edited "
                        "latent is the result. The paper's own path (random noise at strength 0.5, three noise "
                        "samples, then stock inpainting inside the mask) is AttnEdit_InstantMaskEstimate.",
            inputs=word_inputs() + rule_inputs() + [start_map_input(), prompts_input()],
            outputs=[MaskStrategy.Output("mask_strategy", display_name="mask_strategy",
                                         tooltip="Connect to AttnEdit_EditSampler's mask_strategy.")],
        )

    @classmethod
    def validate_inputs(cls, map_side, object_similarity, background_similarity, threshold, start_map="inverted"):
        return check_widgets(cls, map_side=map_side, object_similarity=object_similarity,
                             background_similarity=background_similarity, threshold=threshold, start_map=start_map)

    @classmethod
    def execute(cls, target_prompt, words, map_side, object_similarity, background_similarity, blur_passes,
                threshold, start_map="inverted", clip=None, prompts=None) -> io.NodeOutput:
        clip, target_prompt = prompt_from(prompts, clip, target_prompt, "target_prompt", "Instant Attention Mask")
        groups, edit_words, names = named_word_groups(clip, target_prompt, words)
        return io.NodeOutput(InstantMaskStrategy(groups, edit_words, map_side, object_similarity,
                                                 background_similarity, blur_passes, threshold,
                                                 invert_start=start_map == "inverted", word_names=names,
                                                 t5_words=t5_word_groups(clip, target_prompt, words)))
