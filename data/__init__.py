"""Token shards: `gptspec data prepare` writes them (prepare.py), `TokenShards` reads them (shards.py).

    from gptspec.data import TokenShards, prepare
    prepare(["shakespeare-slice"], "data/shk_char", tokenizer="char")
    ds = TokenShards.open("data/shk_char")
    x, y = ds.batch("train", 12, 64, seed=1337, step=0, micro=0)

SPEC.md 21 defines the layout; docs/data.md describes the command and the built-in corpus.
"""
from .shards import FORMAT, VERSION, TokenShards
from .tokenizers import CharTokenizer, GPT2Tokenizer, tokenizer_from_meta

__all__ = ["TokenShards", "CharTokenizer", "GPT2Tokenizer", "tokenizer_from_meta", "FORMAT", "VERSION"]
