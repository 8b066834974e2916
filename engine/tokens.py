"""Finding words of a prompt among its tokens, through the model's own tokenizers.

The one word finder of the pack: the instant mask and attention regulation both name words through
it. The prompt is tokenized once per tokenizer the model's CLIP has (`tokenize`, by key: SD1.x 'l',
SDXL 'g' and 'l', SD3 'g', 'l' and 't5xxl', Flux 'l' and 't5xxl'); a word is the token ids the same
tokenizer gives it alone, without its start and end tokens, so a word may span several tokens
("watermelon" is one CLIP token, three T5 tokens). Positions are (chunk, index) pairs.

Two kinds of tokenizer: CLIP-style ones (start and end tokens, 77-token chunks: index 0 is a chunk's
start token, the first word at 1) and start-less ones (T5: has_start_token False in the host's
T5XXLTokenizer, comfy/text_encoders/sd3_clip.py and flux.py; one chunk of at least 256 tokens, the first
word at index 0, the end token after the words, then padding). Which one a tokenizer is, is read from
its own output: a start token is the first id of every tokenization, the empty text's included.

What differs between the users is which tokenizer they read (`key`: the one whose tokens the model's
attention sees; by default the first CLIP-style one, which is what a UNet and SD3's CLIP chunk see, and
't5xxl' on Flux, whose context is T5's tokens alone) and which matches they take: the instant mask the
first occurrence in the first chunk (the maps it reads), regulation every occurrence in every chunk
(`occurrences_in`). SDXL's two encoders share CLIP's BPE vocabulary; regulation checks that they agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHUNK = 77  # CLIP's context: ComfyUI encodes long prompts as several 77-token chunks
T5 = "t5xxl"  # the T5-XXL tokenizer's key (Flux: the context the DiT sees; SD3: after CLIP's chunk)
_PROBE = "a"  # a text whose first token is a word's, unless the tokenizer puts a start token first


@dataclass(frozen=True)
class TokenizedPrompt:
    """One tokenizer's view of a prompt: token ids per chunk (None for embedding vectors, which match no
    word), the tokenizer's start id (None: it has none, T5) and end id, and the position of each chunk's
    first end token."""

    key: str
    chunks: tuple[tuple[int | None, ...], ...]
    start: int | None
    end: int

    @property
    def first(self) -> int:
        """Where a chunk's words begin: after the start token, or at 0 without one."""
        return 0 if self.start is None else 1

    @property
    def ends(self) -> tuple[int, ...]:
        """Each chunk's first end token (the chunk's length where it has none)."""
        b = self.first
        return tuple(chunk.index(self.end, b) if self.end in chunk[b:] else len(chunk) for chunk in self.chunks)

    def occurrences_in(self, ids: list[int], chunks: int | None = None) -> list[tuple[int, int]]:
        """(chunk, first index) of every occurrence of the word `ids` between the start token (or the
        chunk's beginning) and the end token, in the first `chunks` chunks (all when None)."""
        ends = self.ends
        return [(c, i) for c, chunk in enumerate(self.chunks[:chunks])
                for i in occurrences(list(chunk), ids, self.first, ends[c])]


def _ids(chunks) -> tuple[tuple[int | None, ...], ...]:
    return tuple(tuple(t[0] if isinstance(t[0], int) else None for t in chunk) for chunk in chunks)


def _as_dict(tokens) -> dict:
    return tokens if isinstance(tokens, dict) else {"l": tokens}


def tokenized(clip, text: str, key: str | None = None) -> dict[str, TokenizedPrompt]:
    """The text through every tokenizer of `clip` that has an end token, by key (SD1.x: 'l'; SDXL: 'g' and
    'l'; SD3: 'g', 'l' and 't5xxl'; Flux: 'l' and 't5xxl'), or through tokenizer `key` alone (a clear
    error if the CLIP has none by that key)."""
    empty, tokens = _as_dict(clip.tokenize("")), _as_dict(clip.tokenize(text))
    if key is not None and key not in tokens:
        raise ValueError(f"the CLIP given has no '{key}' tokenizer (it has {', '.join(sorted(tokens))})")
    probe = None
    out = {}
    for k in sorted(tokens) if key is None else [key]:
        if k not in empty or not empty[k] or not empty[k][0]:
            continue
        specials = _ids(empty[k])[0]
        if probe is None:
            probe = _as_dict(clip.tokenize(_PROBE))
        has_start = k in probe and _ids(probe[k])[0][:1] == specials[:1]  # every text begins with it
        if has_start and len(specials) < 2:
            continue
        start, end = (specials[0], specials[1]) if has_start else (None, specials[0])
        out[k] = TokenizedPrompt(k, _ids(tokens[k]), start, end)
    return out


def first_tokenized(clip, text: str, key: str | None = None) -> TokenizedPrompt:
    """Tokenizer `key`'s view of the text; by default the first CLIP-style tokenizer's (start and end
    tokens)."""
    found = tokenized(clip, text, key)
    if key is not None:
        if key not in found:
            raise ValueError(f"the CLIP's '{key}' tokenizer gives no end token to find words with")
        return found[key]
    clip_style = [tp for tp in found.values() if tp.start is not None]
    if not clip_style:
        raise ValueError("the CLIP given has no CLIP-style tokenizer (start and end tokens) to find words with")
    return clip_style[0]


def word_ids(clip, word: str, key: str) -> list[int]:
    """The ids tokenizer `key` gives `word` alone, start and end tokens left out."""
    alone = tokenized(clip, word, key)[key]
    chunk = alone.chunks[0]
    return [t for t in chunk[alone.first:alone.ends[0]] if t is not None]


def occurrences(sequence: list, part: list, begin: int = 0, stop: int | None = None) -> list[int]:
    """Every start index of `part` in sequence[begin:stop] (token ids; None never matches)."""
    stop = len(sequence) if stop is None else stop
    if not part or None in part:
        return []
    return [i for i in range(begin, stop - len(part) + 1) if sequence[i:i + len(part)] == part]


def prompt_words(prompt: str) -> list[str]:
    return [w for w in re.findall(r"[\w'-]+", prompt) if w]


def word_positions(clip, prompt: str, words: list[str], key: str | None = None) -> list[list[int]]:
    """Token positions in the first chunk of each requested word's (or phrase's) first occurrence, in
    tokenizer `key`'s tokens (default: the first CLIP-style one); a clear error if one is absent or only
    comes after the first 77 tokens."""
    tp = first_tokenized(clip, prompt, key)
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


def prompt_word_positions(clip, prompt: str, key: str | None = None) -> list[list[int]]:
    """Token positions of every word of the prompt, in order (multi-token words kept together)."""
    return [positions for _, positions in prompt_word_table(clip, prompt, key)]


def prompt_word_table(clip, prompt: str, key: str | None = None) -> list[tuple[str, list[int]]]:
    """(word, token positions) of every word of the prompt found among its first chunk's tokens (CLIP: 77;
    T5: one chunk), in tokenizer `key`'s tokens, in order: each word is looked for after the previous one,
    so a repeated word gets its own positions."""
    tp = first_tokenized(clip, prompt, key)
    table, cursor = [], tp.first
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
