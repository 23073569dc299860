"""Multiple-choice scoring in the completion style of GPT-3 and build-nanogpt (SPEC.md 23): each
candidate ending is scored by the model's loss on the ending's tokens given the context, never seeing
the other candidates; the lowest loss is the model's answer.

Rendering: the context and " " + ending are tokenized separately with the offline GPT-2 tokenizer
and concatenated (the leading space because the GPT-2 tokenizer attaches a word's space to the word).
The four rows of an example are right-padded to one length and run as one (4, T) batch; padding
follows every scored position, so causal attention keeps it out of every score. A context too long
for the model loses tokens from its left, once for all four rows, so that they share their context.

Scoring, in float64 on the host from the backend's logits, so that the logits are the only place two
backends can differ: at each position p predicting a scored token y (p = the last context token up to
the ending's second-to-last token), -log softmax(logits[p])[y]; a candidate's summed loss is the sum
over its ending's tokens (`acc`), its average loss that sum divided by their number (`acc_norm`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..spec import InputError
from ..spec.reference.ops import cross_entropy_forward
from .hellaswag import Example

PAD_ID = 0                 # any id the model has: never scored
TOKENIZER_VOCAB = 50257    # the GPT-2 tokenizer's ids 0..50256 (<|endoftext|> is 50256)


def encoding():
    from ..tokenizer import get_encoding

    return get_encoding("gpt2")


@dataclass(frozen=True)
class Rendered:
    tokens: np.ndarray            # (4, T) int64: context + ending, right-padded with PAD_ID
    ctx_len: int                  # context tokens kept
    ending_lens: tuple[int, ...]  # tokens of each ending (all scored)
    truncated: int                # context tokens dropped from the left to fit n_positions


def render(example: Example, n_positions: int, pad_multiple: int = 1, enc=None) -> Rendered:
    """The (4, T) batch of one example for a model of `n_positions` positions: T is the longest row
    rounded up to a multiple of `pad_multiple` (at most n_positions), so that compiling backends see
    few distinct shapes."""
    enc = enc or encoding()
    # encode_ordinary: a text that spells "<|endoftext|>" is text here, not the special token
    ctx = enc.encode_ordinary(example.ctx)
    endings = [enc.encode_ordinary(" " + e) for e in example.endings]
    longest = max(len(e) for e in endings)
    room = n_positions - longest  # context tokens that fit beside the longest ending
    if room < 1:
        raise InputError(f"{example.where}: ending {max(range(len(endings)), key=lambda i: len(endings[i]))} "
                         f"has {longest} tokens; a model of {n_positions} positions scores endings of at most "
                         f"{n_positions - 1} tokens (one context token must precede them)")
    truncated = max(len(ctx) - room, 0)
    ctx = ctx[truncated:]
    length = len(ctx) + longest
    T = min(-(-length // pad_multiple) * pad_multiple, n_positions)
    tokens = np.full((len(endings), T), PAD_ID, dtype=np.int64)
    for i, e in enumerate(endings):
        tokens[i, : len(ctx) + len(e)] = ctx + e
    return Rendered(tokens, len(ctx), tuple(len(e) for e in endings), truncated)


@dataclass(frozen=True)
class Scores:
    losses: tuple[float, ...]     # each candidate's summed loss over its ending's tokens
    n_tokens: tuple[int, ...]     # each candidate's scored tokens
    logit_scale: float            # max |logit| over the scored positions: the scale of SPEC.md 9's rel_max

    @property
    def avg_losses(self) -> tuple[float, ...]:
        return tuple(s / n for s, n in zip(self.losses, self.n_tokens))

    @property
    def pred(self) -> int:
        return lowest(self.losses)

    @property
    def pred_norm(self) -> int:
        return lowest(self.avg_losses)


def lowest(values: Sequence[float]) -> int:
    """The index of the lowest value; among exact ties the first."""
    return int(np.argmin(np.asarray(values, np.float64)))


def score(logits: np.ndarray, rendered: Rendered, vocab_size: int) -> Scores:
    """Each candidate's loss from the (4, T, V') logits of rendered.tokens (V' >= vocab_size: padding
    ids of the vocabulary are not part of the softmax)."""
    c = rendered.ctx_len
    losses, scale = [], 0.0
    for i, n in enumerate(rendered.ending_lens):
        rows = np.asarray(logits[i, c - 1 : c - 1 + n, :vocab_size], np.float64)  # positions predicting the ending
        mean, _ = cross_entropy_forward(rows, rendered.tokens[i, c : c + n])  # SPEC.md 4's loss, in float64
        losses.append(float(mean) * n)
        scale = max(scale, float(np.abs(rows).max()))
    return Scores(tuple(losses), rendered.ending_lens, scale)


def accuracy(correct: Sequence[bool]) -> tuple[float, float | None]:
    """The fraction correct and its standard error, sqrt(p (1 - p) / (n - 1)): the sample standard
    deviation over sqrt(n), as lm-evaluation-harness reports it (None for a single example)."""
    n = len(correct)
    if n == 0:
        raise InputError("accuracy of no examples")
    p = sum(map(bool, correct)) / n
    return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None)
