"""The GPT-2 tokenizer, offline: tiktoken's Encoding over the vendored vocabulary.

data/gpt2.tiktoken is OpenAI's GPT-2 BPE ranks (MIT License; see data/NOTICE).
"""
from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from pathlib import Path

import tiktoken

VOCAB_FILE = Path(__file__).parent / "data" / "gpt2.tiktoken"
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k/gpt2 pre-tokenisation pattern
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def _ranks(path: Path) -> dict[bytes, int]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise RuntimeError(f"{path}: the vendored GPT-2 vocabulary is damaged (sha256 mismatch)")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=None)
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """tiktoken's GPT-2 Encoding, built from the vendored file (no network)."""
    if name != "gpt2":
        raise ValueError(f"unknown encoding {name!r}; gptspec ships 'gpt2'")
    ranks = _ranks(VOCAB_FILE)
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1,
    )
