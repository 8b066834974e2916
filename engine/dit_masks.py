"""InstDiffEdit's instant mask on Flux and SD3.5: the maps from the joint attention (engine/instant_mask.py
dispatches here by model family; the mask rule is attention/instant_mask.py's, unchanged).

On a DiT the image tokens' attention to the prompt is inside the joint attention: for the conditional target
rows, the image queries' probabilities over the text keys, the softmax taken over the full joint key set
(attention/joint.py image_text_probabilities), averaged over heads, at the token grid (the latent side / the
patch size: map_side 1/2 on Flux and SD3.5; every joint attention is at that one resolution, so the node's
map_side does not apply), averaged over the selected blocks and the steps in the run's fixed-size running sum.
Image-only attentions (SD3.5 medium's second self-attention) have no text and are not read.

Which text token is the paper's start token (its inverted map finds the index word when no word is named):
- SD3 / SD3.5: the conditioning is [CLIP-L | CLIP-G (77-token chunks, channels concatenated), then T5's
  tokens] along the tokens (comfy/text_encoders/sd3_clip.py SD3ClipModel.encode_token_weights), so text
  token 0 is CLIP's start token and the word positions the pack's word finder gives (the first CLIP chunk,
  engine/tokens.py) index the first 77 text tokens: the paper's rule as on the UNet. This holds where the text
  encoder has CLIP-L or CLIP-G; a T5-only SD3 text encoder puts T5's tokens first, which the positions do not
  index.
- Flux.1: the conditioning is T5's tokens alone (comfy/text_encoders/flux.py FluxClipModel: CLIP-L gives only
  the pooled vector), so the words' positions are those of the CLIP's 't5xxl' tokenization (engine/tokens.py,
  key T5: the first word is text token 0, then the end token and padding to at least 256 tokens). With words
  named the mask is the paper's rule on those words' maps (the named words are the index word, the start
  token's map is not read). T5 has no start token, so no text token has its role: with no word named (the
  paper's default, which finds the index word through the start token's map) the instant mask is refused on
  Flux, by name, before any compute.
"""

from __future__ import annotations

from ..attention.dit_blocks import dit_block_selected, parse_dit_block_spec
from ..attention.joint import image_text_probabilities
from ..attention.layout import TARGET
from .dit import FLUX, add_dit_attention

INSTANT_DIT_BLOCKS = "all"  # every joint attention (Flux: double and single blocks; SD3: the joint blocks)


def check_instant_mask_family(family: str, named: bool, t5_words=None) -> None:
    """A clear refusal where the instant mask cannot work (before any compute). On Flux: `named` whether the
    user named the word(s) to edit; `t5_words` the words' positions among T5's tokens (engine/instant_mask.py
    WordGroups), or the reason they could not be found (a str), or None when the CLIP has no T5 tokenizer: a
    CLIP-prompted Flux (the toy flow world), whose context is the CLIP tokens, start token first, so the
    paper's rule holds as on SD3."""
    if family != FLUX or t5_words is None:
        return
    if not named:
        raise ValueError("the instant mask (InstDiffEdit) on Flux needs the word(s) to edit named in its 'words' "
                         "input: with none named the paper's rule finds the index word through the start token's "
                         "map, and Flux's prompt is T5's tokens alone, which have no start token. Name the "
                         "word(s) to edit (e.g. 'cat'), or use a user MASK (Edit Sampler edit_mask) or the "
                         "Adaptive Mask")
    if isinstance(t5_words, str):
        raise ValueError(f"the instant mask on Flux reads the words among T5's tokens: {t5_words}")


def add_instant_mask_capture_dit(model, family: str, owns_run, blocks: str = INSTANT_DIT_BLOCKS):
    """A clone that feeds the run's accumulator (`owns_run(call)`: the InstantMaskRun of this strategy, or
    None) with the conditional target rows' image->text maps of every selected joint attention; it reads
    only, the attention computes as before. The family's refusals (check_instant_mask_family) come first,
    from the strategy."""
    items = parse_dit_block_spec(blocks)
    m = model.clone()

    def capture_joint_attention(call, q, k, v, previous, source):
        run = owns_run(call)
        if run is not None and call.joint and call.txt.stop > call.txt.start:
            rows = call.cond_rows(TARGET)
            if rows:
                probs = image_text_probabilities(q[rows][:, :, call.img], k[rows], call.txt)
                run.add_maps(probs, call.map_hw)
        return previous(q, k, v)

    count = add_dit_attention(m, "instant mask capture", capture_joint_attention,
                              lambda b: dit_block_selected(items, b.kind, b.index, b.order, b.total),
                              effect=lambda branch: None)  # reads only
    if count == 0:
        raise ValueError(f"the block selection '{blocks}' matches no block of this model")
    return m
