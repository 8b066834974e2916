"""Finding words of a prompt among its tokens, through the model's own CLIP tokenizer.

The one word finder of the pack: the instant mask and attention regulation both name words through
it. The prompt is tokenized once per CLIP-style tokenizer the model has (`tokenize`: start and end
tokens, 77-token chunks); a word is the token ids the same tokenizer gives it alone, without its start
and end tokens, so a word may span several tokens ("watermelon" is one, rare words are more). Positions
are (chunk, index) pairs, index 0 being a chunk's start token. What differs between the users is only
which matches they take: the instant mask the first occurrence in the first chunk (the maps it reads),
regulation every occurrence in every chunk (`occurrences_in`). SDXL's two encoders share CLIP's BPE
vocabulary; regulation checks that they agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHUNK = 77  # CLIP's context: ComfyUI encodes long prompts as several 77-token chunks


@dataclass(frozen=True)
class TokenizedPrompt:
    """One tokenizer's view of a prompt: token ids per chunk (None for embedding vectors, which match no
    word), the tokenizer's start and end ids, and the position of each chunk's first end token."""

    key: str
    chunks: tuple[tuple[int | None, ...], ...]
    start: int
    end: int

    @property
    def ends(self) -> tuple[int, ...]:
        """Each chunk's first end token (the chunk's length where it has none)."""
        return tuple(chunk.index(self.end, 1) if self.end in chunk[1:] else len(chunk) for chunk in self.chunks)

    def occurrences_in(self, ids: list[int], chunks: int | None = None) -> list[tuple[int, int]]:
        """(chunk, first index) of every occurrence of the word `ids` between start and end token, in the
        first `chunks` chunks (all when None)."""
        ends = self.ends
        return [(c, i) for c, chunk in enumerate(self.chunks[:chunks])
                for i in occurrences(list(chunk), ids, 1, ends[c])]


def _ids(chunks) -> tuple[tuple[int | None, ...], ...]:
    return tuple(tuple(t[0] if isinstance(t[0], int) else None for t in chunk) for chunk in chunks)


def tokenized(clip, text: str) -> dict[str, TokenizedPrompt]:
    """The text through every CLIP-style tokenizer of `clip` (those with start and end tokens), by key
    (SD1.x: 'l'; SDXL: 'g' and 'l')."""
    empty, tokens = clip.tokenize(""), clip.tokenize(text)
    if not isinstance(tokens, dict):
        tokens, empty = {"l": tokens}, {"l": empty}
    out = {}
    for key in sorted(tokens):
        if key not in empty or len(empty[key][0]) < 2:
            continue
        specials = _ids(empty[key])[0]
        out[key] = TokenizedPrompt(key, _ids(tokens[key]), specials[0], specials[1])
    return out


def first_tokenized(clip, text: str) -> TokenizedPrompt:
    found = tokenized(clip, text)
    if not found:
        raise ValueError("the CLIP given has no CLIP-style tokenizer (start and end tokens) to find words with")
    return next(iter(found.values()))


def word_ids(clip, word: str, key: str) -> list[int]:
    """The ids tokenizer `key` gives `word` alone, start and end tokens left out."""
    alone = tokenized(clip, word)[key]
    chunk = alone.chunks[0]
    return [t for t in chunk[1:alone.ends[0]] if t is not None]


def occurrences(sequence: list, part: list, begin: int = 0, stop: int | None = None) -> list[int]:
    """Every start index of `part` in sequence[begin:stop] (token ids; None never matches)."""
    stop = len(sequence) if stop is None else stop
    if not part or None in part:
        return []
    return [i for i in range(begin, stop - len(part) + 1) if sequence[i:i + len(part)] == part]


def prompt_words(prompt: str) -> list[str]:
    return [w for w in re.findall(r"[\w'-]+", prompt) if w]


def word_positions(clip, prompt: str, words: list[str]) -> list[list[int]]:
    """Token positions in the first chunk of each requested word's (or phrase's) first occurrence; a clear
    error if one is absent or only comes after the first 77 tokens."""
    tp = first_tokenized(clip, prompt)
    found = []
    for word in words:
        ids = word_ids(clip, word, tp.key)
        where = tp.occurrences_in(ids)
        first = [i for c, i in where if c == 0]
        if not first and where:
            raise ValueError(f"'{word}' comes after the prompt's first 77 tokens, which are all the mask reads: "
                             f"shorten the prompt or move the word forward")
        if not first:
            raise ValueError(f"'{word}' is not in the prompt \"{prompt}\": name words that appear in it "
                             f"(its words: {', '.join(prompt_words(prompt))})")
        found.append(list(range(first[0], first[0] + len(ids))))
    return found


def prompt_word_positions(clip, prompt: str) -> list[list[int]]:
    """Token positions of every word of the prompt, in order (multi-token words kept together)."""
    return [positions for _, positions in prompt_word_table(clip, prompt)]


def prompt_word_table(clip, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, token positions) of every word of the prompt found among its first 77 tokens, in order: each
    word is looked for after the previous one, so a repeated word gets its own positions."""
    tp = first_tokenized(clip, prompt)
    table, cursor = [], 1
    for word in prompt_words(prompt):
        ids = word_ids(clip, word, tp.key)
        at = [i for c, i in tp.occurrences_in(ids, chunks=1) if i >= cursor]
        if not at:
            continue  # e.g. a word cut off past the first 77 tokens
        table.append((word, list(range(at[0], at[0] + len(ids)))))
        cursor = at[0] + len(ids)
    return table


def parse_words(text: str) -> list[str]:
    """The user's comma-separated words or phrases: white space folded, each named once (case aside)."""
    words, seen = [], set()
    for word in (text or "").split(","):
        word = " ".join(word.split())
        if word and word.lower() not in seen:
            seen.add(word.lower())
            words.append(word)
    return words
