"""Next-token selection (SPEC.md section 12), in numpy: one definition for every backend.

The backends compute logits (with their KV caches); the choice of the next token from them is
spec'd once, here, so that two backends given the same logits and the same seed pick the same
token. Order of operations, as the Hugging Face pipeline applies them: ids at or past the real
vocabulary are removed, then temperature, then top-k, then top-p, then one uniform draw per row
through the inverse CDF.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

EOT = 50256  # GPT-2's <|endoftext|>


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0     # 0 = greedy (argmax; the lowest id among ties)
    top_k: int | None = None     # keep the k most probable ids (and any tied with the k-th)
    top_p: float | None = None   # keep the smallest most-probable set whose mass reaches p
    seed: int = 0

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise InputError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits: np.ndarray, vocab_size: int, s: Sampling) -> np.ndarray:
    """(B, V') float64 logits with every id that cannot be drawn set to -inf."""
    x = np.array(logits, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"logits for sampling must be (batch, vocab), got shape {x.shape}")
    x[:, vocab_size:] = -np.inf  # padding ids are never sampled
    if not np.isfinite(x[:, :vocab_size]).all():
        raise InputError("logits for sampling contain NaN or Inf")
    if s.greedy:
        return x
    x /= s.temperature
    if s.top_k is not None and s.top_k < vocab_size:
        kth = -np.partition(-x, s.top_k - 1, axis=-1)[:, s.top_k - 1 : s.top_k]
        x[x < kth] = -np.inf
    if s.top_p is not None and s.top_p < 1:
        order = np.argsort(-x, axis=-1, kind="stable")
        p = _softmax(np.take_along_axis(x, order, axis=-1))
        before = np.cumsum(p, axis=-1) - p  # the mass of the ids ranked above each id
        drop = before >= s.top_p            # the set already reached p without this id
        np.put_along_axis(x, order, np.where(drop, -np.inf, np.take_along_axis(x, order, axis=-1)), axis=-1)
    return x


def probabilities(logits: np.ndarray, vocab_size: int, s: Sampling) -> np.ndarray:
    """The distribution the next token is drawn from: (B, V') float64."""
    x = filtered_logits(logits, vocab_size, s)
    if s.greedy:
        out = np.zeros_like(x)
        out[np.arange(len(x)), np.argmax(x, axis=-1)] = 1.0
        return out
    return _softmax(x)


def next_tokens(logits: np.ndarray, vocab_size: int, s: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One id per row (int64): the first id whose cumulative probability reaches u * total, for
    u uniform in (0, 1]. Exactly one draw per row, greedy or not, so that the stream of random
    numbers does not depend on the settings."""
    u = 1.0 - rng.random(len(logits))  # (0, 1]: a zero would pick an id without mass
    if s.greedy:
        return np.argmax(filtered_logits(logits, vocab_size, s), axis=-1).astype(np.int64)
    p = probabilities(logits, vocab_size, s)
    cdf = np.cumsum(p, axis=-1)
    ids = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=-1)
    last = p.shape[-1] - 1 - np.argmax((p > 0)[:, ::-1], axis=-1)  # u * total can round past it
    return np.minimum(ids, last).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
