"""Captions as token ids, and where each object's words are among them (for the grounding loss)."""

from __future__ import annotations

from attention_edit.toyworld import model as toymodel

from .. import scenes

OBJECT_WORD_SLOTS = 3  # size, colour, shape: the words of an object phrase the grounding loss ties to it


class CaptionTokens:
    """Token ids of captions as `CLIPTextEncode` feeds the text encoder, and the positions of object words.

    Cached per caption (the world has about 10^4 captions). ``object_tokens(caption)`` lists, for each
    object of the caption in order, the token positions of its size, colour and shape words.
    """

    def __init__(self, clip):
        self.clip = clip
        self._tokens: dict[str, list[int]] = {}
        self._objects: dict[str, list[list[int]]] = {}
        self._word_tokens: dict[str, int] = {}

    def tokens(self, caption: str) -> list[int]:
        if caption not in self._tokens:
            batches = self.clip.tokenize(caption)[toymodel.CLIP_NAME]
            if len(batches) != 1:
                raise ValueError(f"caption longer than one 77-token chunk: {caption!r}")
            self._tokens[caption] = [int(t) for t, _ in batches[0]]
        return self._tokens[caption]

    def _word_length(self, word: str) -> int:
        if word not in self._word_tokens:
            ids = [int(t) for t, _ in self.clip.tokenize(word)[toymodel.CLIP_NAME][0]]
            self._word_tokens[word] = ids.index(toymodel.CLIP_END) - 1  # between the start and end tokens
        return self._word_tokens[word]

    def object_tokens(self, caption: str) -> list[list[int]]:
        if caption not in self._objects:
            words = caption.split()
            starts, position = [], 1  # token 0 is the start token
            for word in words:
                starts.append(position)
                position += self._word_length(word)
            ids = self.tokens(caption)
            if ids[position] != toymodel.CLIP_END:
                raise ValueError(f"word-by-word tokenisation does not match the caption's: {caption!r}")
            objects = []
            for i in range(len(words) - 3):
                if words[i] == "a" and words[i + 1] in scenes.SIZES and words[i + 2] in scenes.COLOURS \
                        and words[i + 3] in scenes.SHAPES:
                    positions = []
                    for w in (i + 1, i + 2, i + 3):
                        positions += list(range(starts[w], starts[w] + self._word_length(words[w])))
                    objects.append(positions)
            self._objects[caption] = objects
        return self._objects[caption]
