"""The two tokenizers of token shards: GPT-2's BPE and nanoGPT's character-level one.

Both have one small interface: `encode(str) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`name`, `eot` (the id put after each document, or None), `encode_array(str)` (uint16 ids, for
preparing shards) and `to_meta()`, the dict `tokenizer_from_meta` rebuilds them from (meta.json's
"tokenizer" entry).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..spec import InputError, WeightsError

UINT16_IDS = 1 << 16  # ids 0..65535 fit a uint16 .bin


class GPT2Tokenizer:
    """GPT-2's BPE, offline (weights/tokenizer.py). Text is encoded with `encode_ordinary`, so a
    literal "<|endoftext|>" in a document is ordinary text, never the special token; the shards put
    `eot` (50256) after every document, as nanoGPT's openwebtext prepare.py does."""

    name = "gpt2"

    def __init__(self):
        from ..weights.tokenizer import get_encoding

        self._enc = get_encoding("gpt2")
        self.vocab_size = self._enc.n_vocab
        self.eot = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_meta(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot": self.eot}


class CharTokenizer:
    """nanoGPT's shakespeare_char: the vocabulary is the sorted set of the corpus's characters,
    id = position in that order (stoi / itos)."""

    name = "char"
    eot = None

    def __init__(self, chars: str):
        if list(chars) != sorted(set(chars)):
            raise InputError("a character vocabulary must list each character once, in sorted order")
        if not chars:
            raise InputError("a character vocabulary needs at least one character (the corpus is empty)")
        if len(chars) > UINT16_IDS:
            raise InputError(f"the corpus has {len(chars)} distinct characters; a uint16 shard holds ids "
                             f"0..{UINT16_IDS - 1}, so at most {UINT16_IDS} characters: use --tokenizer gpt2")
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.itos = dict(enumerate(chars))
        self._points = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4")

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise InputError(f"character {e.args[0]!r} is not in this {self.vocab_size}-character vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a uint16 array, vectorised over code points (the corpus can be megabytes)."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._points, points)
        known = self._points[np.minimum(ids, self.vocab_size - 1)] == points
        if not known.all():
            return np.asarray(self.encode(text), dtype=np.uint16)  # raises, naming the character
        return ids.astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self.itos[int(i)] for i in ids)
        except KeyError as e:
            raise InputError(f"id {e.args[0]} is outside this {self.vocab_size}-character vocabulary") from None

    def to_meta(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "chars": self.chars}


TOKENIZERS = ("char", "gpt2")


def tokenizer_from_meta(meta: dict, where: str = "meta.json"):
    """The tokenizer meta.json describes: `meta` is the whole meta.json dict or its "tokenizer"
    entry. A WeightsError naming `where` if it is not one gptspec knows."""
    entry = meta.get("tokenizer", meta)
    if not isinstance(entry, dict):
        raise WeightsError(f"{where}: 'tokenizer' must be an object, got {entry!r}")
    name = entry.get("name")
    if name == "gpt2":
        tok = GPT2Tokenizer()
    elif name == "char":
        chars = entry.get("chars")
        if not isinstance(chars, str):
            raise WeightsError(f"{where}: a char tokenizer needs 'chars' (a string), got {type(chars).__name__}")
        try:
            tok = CharTokenizer(chars)
        except InputError as e:
            raise WeightsError(f"{where}: {e}") from None
    else:
        raise WeightsError(f"{where}: unknown tokenizer {name!r}; expected one of {', '.join(TOKENIZERS)}")
    if entry.get("vocab_size") != tok.vocab_size:
        raise WeightsError(f"{where}: tokenizer {name} has vocab_size {tok.vocab_size}, "
                           f"meta.json says {entry.get('vocab_size')!r}")
    return tok
