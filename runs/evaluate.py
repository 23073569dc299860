"""What a run measures at each evaluation: the validation loss and a short text sample.

The validation loss is the final layer's cross-entropy over the first vocab_size logits (SPEC.md 4
and 19), whatever training loss the variant optimizes, so that runs of different losses compare:
Backend.forward's float32 logits, then log-softmax and the mean in float64 numpy, one batch row at a
time. Its cost is eval_iters forward passes plus a float64 pass over B x T x V logits per batch
(at the char recipe, 20 batches of 64 x 256: about as long as 7 training steps' forwards).
"""
from __future__ import annotations

import math

import numpy as np

from ..spec import IGNORE_INDEX, ModelSpec


def cross_entropy(logits: np.ndarray, targets: np.ndarray, vocab_size: int) -> tuple[float, int]:
    """(sum of -log p(target) over counted targets, their count), in float64."""
    total, count = 0.0, 0
    for row_logits, row_targets in zip(logits, targets):  # one row at a time: bounded float64 memory
        z = np.asarray(row_logits[:, :vocab_size], dtype=np.float64)
        counted = row_targets != IGNORE_INDEX
        z = z - z.max(-1, keepdims=True)
        logp = z[np.arange(len(z)), np.where(counted, row_targets, 0)] - np.log(np.exp(z).sum(-1))
        total -= float((logp * counted).sum())
        count += int(counted.sum())
    return total, count


def val_loss(backend, model, spec: ModelSpec, batches) -> float:
    """The mean cross-entropy per counted target over every validation batch."""
    total, count = 0.0, 0
    for tokens, targets in batches:
        t, c = cross_entropy(backend.forward(model, tokens), np.asarray(targets), spec.vocab_size)
        total, count = total + t, count + c
    return total / count if count else math.nan


def sample_prompt(tokenizer, spec: ModelSpec) -> list[int]:
    """Where samples start: GPT-2's <|endoftext|> for its tokenizer, else a newline (nanoGPT's
    sample.py start), else id 0."""
    from ..spec.sampling import EOT

    if getattr(tokenizer, "name", "") == "gpt2" and EOT < spec.vocab_size:
        return [EOT]
    try:
        ids = list(tokenizer.encode("\n"))
    except Exception:  # a tokenizer without a newline: start from id 0
        ids = []
    return ids[:1] or [0]


def sample_seed(run_seed: int, step: int) -> int:
    """The sampler's seed at an evaluation: a function of the run's seed and the step, so a resumed run
    draws the samples an uninterrupted one draws, with no generator state to carry."""
    return run_seed * 1_000_003 + step


def sample_text(backend, model, spec: ModelSpec, tokenizer, n_tokens: int, seed: int) -> str:
    from ..backends.generation import generate
    from ..spec.sampling import EOT, Sampling

    prompt = sample_prompt(tokenizer, spec)
    n = min(n_tokens, spec.n_positions - len(prompt))
    stop = EOT if getattr(tokenizer, "name", "") == "gpt2" else None
    out = generate(backend, model, spec, [prompt], n, Sampling(temperature=1.0, top_k=None, seed=seed), stop)
    # a model may have more ids than its data's tokenizer (a padded or larger vocabulary): those have no text
    text, run = [], []
    for t in prompt + [t for t in out.new[0] if t != stop]:
        if t < tokenizer.vocab_size:
            run.append(t)
            continue
        text += [tokenizer.decode(run), "\ufffd"]
        run = []
    return "".join(text) + tokenizer.decode(run)
