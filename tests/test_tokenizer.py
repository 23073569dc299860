"""The offline GPT-2 tokenizer."""
from __future__ import annotations

import tiktoken

from gptspec.tokenizer import ENDOFTEXT, get_encoding


def test_known_encoding():
    # the vocabulary's own README gives this check
    enc = get_encoding("gpt2")
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_special_token_and_vocab_size():
    enc = get_encoding("gpt2")
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode(ENDOFTEXT, allowed_special="all") == [50256]


def test_round_trip_of_awkward_text():
    enc = get_encoding("gpt2")
    text = "  naïve café — 東京 🙂\n\tcode: x=[1,2]  "
    assert enc.decode(enc.encode(text)) == text


def test_unknown_encoding_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown encoding 'cl100k_base'"):
        get_encoding("cl100k_base")
