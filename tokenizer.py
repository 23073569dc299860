"""`gptspec.tokenizer.get_encoding("gpt2")`: the offline GPT-2 tokenizer (see weights/tokenizer.py)."""
from .weights.tokenizer import ENDOFTEXT, get_encoding

__all__ = ["get_encoding", "ENDOFTEXT"]
