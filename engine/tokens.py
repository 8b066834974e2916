"""Finding words of a prompt among its tokens, through the model's own CLIP tokenizer.

The one word finder of the pack: the instant mask and attention regulation both name words through
it. Positions are indices into a 77-token chunk of the encoded prompt (index 0 is the start token; the
instant mask reads the first chunk, regulation every chunk). A word may span several tokens
("watermelon" is one, rare words are more). SDXL's two encoders share CLIP's BPE vocabulary, so the
first tokenizer's positions serve both.
"""

from __future__ import annotations

import re


def _chunk_ids(clip, text: str) -> list[list[int]]:
    """Token ids of every 77-token chunk of the encoded text."""
    tokens = clip.tokenize(text)
    first = tokens[sorted(tokens)[0]] if isinstance(tokens, dict) else tokens
    return [[t[0] for t in chunk] for chunk in first]


def _token_ids(clip, text: str) -> list[int]:
    return _chunk_ids(clip, text)[0]


def _specials(clip) -> tuple[int, int]:
    empty = _token_ids(clip, "")
    return empty[0], empty[1]


def _word_ids(clip, word: str) -> list[int]:
    start, end = _specials(clip)
    return [t for t in _token_ids(clip, word) if t not in (start, end)]


def occurrences(sequence: list, part: list, begin: int = 0, stop: int | None = None) -> list[int]:
    """Every start index of `part` in sequence[begin:stop] (token ids; None never matches)."""
    stop = len(sequence) if stop is None else stop
    if not part or None in part:
        return []
    return [i for i in range(begin, stop - len(part) + 1) if sequence[i:i + len(part)] == part]


def _find(sequence: list[int], part: list[int], begin: int = 0) -> int:
    found = occurrences(sequence, part, begin)
    return found[0] if found else -1


def word_positions(clip, prompt: str, words: list[str]) -> list[list[int]]:
    """Token positions of each requested word (or phrase) in the prompt; a clear error if one is absent."""
    chunks = _chunk_ids(clip, prompt)
    prompt_ids = chunks[0]
    found = []
    for word in words:
        ids = _word_ids(clip, word)
        at = _find(prompt_ids, ids) if ids else -1
        if at < 0 and ids and any(_find(chunk, ids) >= 0 for chunk in chunks[1:]):
            raise ValueError(f"'{word}' comes after the prompt's first 77 tokens, which are all the mask reads: "
                             f"shorten the prompt or move the word forward")
        if at < 0:
            raise ValueError(f"'{word}' is not in the prompt \"{prompt}\": name words that appear in it "
                             f"(its words: {', '.join(prompt_words(prompt))})")
        found.append(list(range(at, at + len(ids))))
    return found


def prompt_words(prompt: str) -> list[str]:
    return [w for w in re.findall(r"[\w'-]+", prompt) if w]


def prompt_word_positions(clip, prompt: str) -> list[list[int]]:
    """Token positions of every word of the prompt, in order (multi-token words kept together)."""
    prompt_ids = _token_ids(clip, prompt)
    groups, cursor = [], 1
    for word in prompt_words(prompt):
        ids = _word_ids(clip, word)
        at = _find(prompt_ids, ids, cursor) if ids else -1
        if at < 0:
            continue  # e.g. a word cut off past the first 77 tokens
        groups.append(list(range(at, at + len(ids))))
        cursor = at + len(ids)
    return groups


def parse_words(text: str) -> list[str]:
    """The user's comma-separated words or phrases: white space folded, each named once (case aside)."""
    words, seen = [], set()
    for word in (text or "").split(","):
        word = " ".join(word.split())
        if word and word.lower() not in seen:
            seen.add(word.lower())
            words.append(word)
    return words
