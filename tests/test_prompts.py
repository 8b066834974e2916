"""AttnEdit_EditPrompts: each prompt typed once. A change of the target text in Edit Prompts reaches the nodes
that read its words (the instant mask's word groups, the regulation's tokens), and a stale copy typed into such a
node while 'prompts' is connected is refused (nodes/common.py prompt_from)."""

from __future__ import annotations

import pytest
import torch

from attention_edit.engine.regulation import find_target_tokens
from attention_edit.engine.tokens import prompt_word_positions, word_positions
from attention_edit.nodes.common import PromptTexts, prompt_from
from attention_edit.nodes.instant_mask import InstantMask
from attention_edit.nodes.prompts import EditPrompts
from attention_edit.nodes.regulation import AttentionRegulation

PROMPT_A = "a large red circle in the center on a white background"
PROMPT_B = "a small green xylophonist on the left on a gray background"
RULE = dict(map_side=0.25, object_similarity=0.9, background_similarity=0.6, blur_passes=2, threshold=0.2)


@pytest.fixture(scope="module")
def toy():
    from attention_edit.toyworld.model import build_toy, default_config

    return build_toy(default_config())


def edit_prompts(clip, target: str, source: str = "", negative: str = ""):
    return EditPrompts.execute(clip=clip, source=source, target=target, negative=negative).args


def mask_from(prompts, words: str = "", target_prompt: str = ""):
    return InstantMask.execute(target_prompt=target_prompt, words=words, prompts=prompts, **RULE).args[0]


def test_edit_prompts_encodes_as_clip_text_encode(toy):
    _, clip, _ = toy
    source, target, negative, prompts = edit_prompts(clip, PROMPT_B, source=PROMPT_A)
    for cond, text in ((source, PROMPT_A), (target, PROMPT_B), (negative, "")):
        expected = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        assert len(cond) == len(expected)
        for (t, opts), (e, e_opts) in zip(cond, expected):
            torch.testing.assert_close(t, e, rtol=0, atol=0)
            assert set(opts) == set(e_opts)
    assert isinstance(prompts, PromptTexts)
    assert (prompts.source, prompts.target, prompts.negative, prompts.clip) == (PROMPT_A, PROMPT_B, "", clip)
    assert not torch.equal(source[0][0], target[0][0])  # different texts, different encodings


def test_the_instant_mask_follows_the_target_typed_in_edit_prompts(toy):
    _, clip, _ = toy
    first = mask_from(edit_prompts(clip, PROMPT_A)[3])
    assert first.words == prompt_word_positions(clip, PROMPT_A)
    assert first.word_names[:4] == ["a", "large", "red", "circle"]
    # The target changed in one place, Edit Prompts: the mask reads the new words, the node itself untouched.
    second = mask_from(edit_prompts(clip, PROMPT_B)[3])
    assert second.words == prompt_word_positions(clip, PROMPT_B)
    assert second.words != first.words  # "xylophonist" spans several tokens: the groups move
    assert "xylophonist" in second.word_names and "circle" not in second.word_names
    # A named word is looked up in the current target: present in B, absent from A.
    named = mask_from(edit_prompts(clip, PROMPT_B)[3], words="xylophonist")
    assert [named.words[i] for i in named.edit_words] == word_positions(clip, PROMPT_B, ["xylophonist"])
    with pytest.raises(ValueError, match="'xylophonist' is not in the prompt"):
        mask_from(edit_prompts(clip, PROMPT_A)[3], words="xylophonist")


def regulate(model, prompts, target_words: str, prompt: str = ""):
    return AttentionRegulation.execute(model=model, prompt=prompt, target_words=target_words, end_percent=0.5,
                                       iterations=1, learning_rate=100.0, ema=0.25, decay=0.99, peak_target=0.9,
                                       share_weight=80.0, beta=0.09, blocks="input, output", map_side=0.25,
                                       prompts=prompts).args[0]


def test_regulation_reads_the_target_of_edit_prompts(toy):
    model, clip, _ = toy
    for text in (PROMPT_A, PROMPT_B):
        used_clip, used = prompt_from(edit_prompts(clip, text)[3], None, "", "prompt", "Attention Regulation")
        assert used_clip is clip and used == text
    # The regulated words are looked up in Edit Prompts' current target: after the change, the new word is
    # found and patched in, the old one is refused.
    regulated = regulate(model, edit_prompts(clip, PROMPT_B)[3], "xylophonist")
    assert regulated is not model and find_target_tokens(clip, PROMPT_B, "xylophonist").groups[0]
    with pytest.raises(ValueError, match="'xylophonist' not found in the prompt"):
        regulate(model, edit_prompts(clip, PROMPT_A)[3], "xylophonist")
    with pytest.raises(ValueError, match="'circle' not found in the prompt"):
        regulate(model, edit_prompts(clip, PROMPT_B)[3], "circle")


def test_a_stale_copy_of_the_prompt_is_refused(toy):
    model, clip, _ = toy
    prompts = edit_prompts(clip, PROMPT_B)[3]
    with pytest.raises(ValueError, match="clear 'target_prompt'"):
        mask_from(prompts, target_prompt=PROMPT_A)
    with pytest.raises(ValueError, match="clear 'prompt'"):
        regulate(model, prompts, "", prompt=PROMPT_A)
    # The same text (spacing aside) is not a second prompt: accepted.
    same = mask_from(prompts, target_prompt="  " + PROMPT_B.replace(" ", "  ") + "\n")
    assert same.words == prompt_word_positions(clip, PROMPT_B)


def test_without_prompts_the_node_needs_its_clip_and_text(toy):
    _, clip, _ = toy
    with pytest.raises(ValueError, match="connect 'prompts'"):
        InstantMask.execute(target_prompt=PROMPT_A, words="", **RULE)
    own = InstantMask.execute(target_prompt=PROMPT_A, words="", clip=clip, **RULE).args[0]
    assert own.words == mask_from(edit_prompts(clip, PROMPT_A)[3]).words  # stock wiring: the same mask
    with pytest.raises(ValueError, match="AttnEdit_EditPrompts"):
        prompt_from("not prompts", None, "", "target_prompt", "Instant Attention Mask")
