"""InstDiffEdit's instant attention mask (arXiv 2401.07709) as a mask strategy for the branch sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.instant_mask import CHUNK_TOKENS, MapAccumulator, attention_probabilities, instant_mask
from ..attention.layout import TARGET
from .contract import AttentionCall
from .masks import LatentReplaceRun
from .patching import UNET, add_attention_replace, model_family


@dataclass(frozen=True)
class WordGroups:
    """The prompt's words in one tokenizer's tokens: each word's (or phrase's) token positions, the indices
    among them of the user's named words (None: none named), and the word each group stands for."""

    words: list[list[int]]
    edit_words: list[int] | None
    names: list[str] | None = None


class InstantMaskStrategy:
    """InstDiffEdit's instant mask from the target branch's own cross-attention, made on the fly inside the
    Edit Sampler (the pack's variant; the paper's own path is AttnEdit_InstantMaskEstimate + inpainting).

    A capture patch reads the conditional target rows' attention probabilities in the selected
    low-resolution layers into the run's fixed-size running sum; the mask is recomputed from it each step
    with the official rule, the word classes decided at the first step (attention/instant_mask.py). On SD3 /
    SD3.5 and Flux the maps are the joint attention's image->text probabilities (engine/dit_masks.py).

    `words`, `edit_words` and `word_names` index the CLIP-style tokens (what a UNet and SD3's CLIP chunk
    see); `t5_words` the same words among T5's tokens (the context Flux.1 sees), or the reason they could not
    be found there (a str); None where the CLIP has no T5 tokenizer (a CLIP-prompted Flux such as the toy
    flow world reads the CLIP-style tokens, start token first). On Flux.1 without named words the strategy
    is refused when prepared (T5 has no start token).
    """

    needs_aux = False
    reads_source_prediction = False

    def __init__(self, words: list[list[int]], edit_words: list[int] | None, map_side: float = 0.25,
                 object_similarity: float = 0.9, background_similarity: float = 0.6, blur_passes: int = 2,
                 threshold: float = 0.2, invert_start: bool = True, min_object_left: float = 0.0,
                 word_names: list[str] | None = None, t5_words: WordGroups | str | None = None):
        self.words, self.edit_words, self.map_side = words, edit_words, map_side
        self.word_names = word_names  # the word each group of `words` stands for (the Edit Sampler's report)
        self.t5_words = t5_words
        self.settings = dict(object_similarity=object_similarity, background_similarity=background_similarity,
                             blur_passes=blur_passes, threshold=threshold, invert_start=invert_start,
                             min_object_left=min_object_left)

    def prepare(self, model):
        family = model_family(model)
        if family != UNET:  # Flux / SD3: the joint attention's image->text maps (engine/dit_masks.py)
            from .dit import FLUX
            from .dit_masks import add_instant_mask_capture_dit, check_instant_mask_family

            check_instant_mask_family(family, bool(self.edit_words), self.t5_words)
            # Flux.1's context is T5's tokens; a CLIP-prompted Flux's (no T5 tokenizer) the CLIP tokens
            groups = self.t5_words if family == FLUX and self.t5_words is not None else self.clip_words

            def owns_run(call):
                run = call.run.mask_run if call.run is not None else None
                if not (isinstance(run, InstantMaskRun) and run.strategy is self):
                    return None
                run.read_words(groups)  # the tokens this model's context holds
                return run

            return add_instant_mask_capture_dit(model, family, owns_run)
        m = model.clone()

        def capture_cross_attention(call: AttentionCall, q, k, v, previous, source):
            run = call.run.mask_run if call.run is not None else None
            if isinstance(run, InstantMaskRun) and run.strategy is self:
                run.capture(call, q, k)
            return previous(q, k, v)

        add_attention_replace(m, "attn2", "instant mask capture", capture_cross_attention,
                              lambda key: key[0] in ("input", "output"), effect=lambda branch: None)  # reads only
        return m

    @property
    def clip_words(self) -> WordGroups:
        return WordGroups(self.words, self.edit_words, self.word_names)

    def start(self, layout, sigmas, trajectory, model_sampling) -> InstantMaskRun:
        return InstantMaskRun(self, layout, trajectory)


class InstantMaskRun(LatentReplaceRun):
    def __init__(self, strategy: InstantMaskStrategy, layout, trajectory):
        super().__init__(layout, trajectory, self.current_mask)
        self.strategy = strategy
        self.groups = strategy.clip_words  # which tokens the maps index: the CLIP-style ones unless told
        # the first CLIP chunk's 77 tokens, or up to the last word's (T5's on Flux)
        t5 = strategy.t5_words.words if isinstance(strategy.t5_words, WordGroups) else []
        self.accumulator = MapAccumulator(max([CHUNK_TOKENS] + [p + 1 for w in strategy.words + t5 for p in w]))
        self.peak_stored = 0  # the largest the running sum got (elements): it never grows with steps
        self.classes = None  # the word classes, decided at the first step and kept

    @property
    def word_names(self) -> list[str] | None:
        """The word each of this run's groups stands for (the Edit Sampler's report)."""
        return self.groups.names

    def read_words(self, groups: WordGroups) -> None:
        """The maps index these words' tokens (a DiT capture says which tokenizer's, before its first maps)."""
        self.groups = groups

    def capture(self, call: AttentionCall, q, k) -> None:
        s = self.strategy
        if call.map_side is None or abs(call.map_side - s.map_side) > 1e-6:
            return
        rows = call.cond_rows(TARGET)
        if not rows:
            return
        self.add_maps(attention_probabilities(q[rows], k[rows], call.heads), call.map_hw)

    def add_maps(self, probs: torch.Tensor, side: tuple[int, int]) -> None:
        """probs (rows, h*w, tokens): one layer call's maps of the conditional target rows."""
        self.accumulator.add(probs, side)
        self.peak_stored = max(self.peak_stored, self.accumulator.stored_elements())

    def current_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        maps = self.accumulator.mean()
        if maps is None:
            return None
        s, g = self.strategy, self.groups
        mask, self.classes = instant_mask(maps, g.words, tuple(like.shape[-2:]), edit_words=g.edit_words,
                                          classes=self.classes, **s.settings)
        return mask.to(like)
