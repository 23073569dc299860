"""Generation with a KV cache, shared by every backend (SPEC.md section 12).

A backend supplies one operation, `extend(model, tokens, cache, last_only)`: run (B, t) new tokens
through the model at the positions after those already in `cache` (None: an empty cache) and
return their logits as float32 numpy, with the grown cache. Everything else (prompts of different
lengths, sampling, stopping, the context limit) is defined once, here and in spec/sampling.py,
so that every backend makes the same choices from the same logits.

Prompts of different lengths share one cache without padding or masks: the batch is prefilled
to the shortest prompt's length, and each longer prompt's remaining tokens are fed in place of
samples, one step at a time (as Meta's LLaMA reference does), so positions stay aligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..spec import InputError, ModelSpec
from ..spec.sampling import EOT, Sampling, next_tokens


@dataclass
class Step:
    """One step of a batch: the token each row gained (prompt or sampled) and which were sampled."""
    position: int          # the position the tokens occupy
    tokens: np.ndarray     # (B,) int64
    sampled: np.ndarray    # (B,) bool: generated here (not copied from the prompt, not after a stop)
    finished: np.ndarray   # (B,) bool: the row has stopped (this step's token may be the stop)


@dataclass
class Generation:
    """The result of `generate`: each row's new tokens, and why each row stopped."""
    prompts: list[list[int]]
    new: list[list[int]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)   # "stop token", "max_new_tokens" or "context"


def check_prompts(spec: ModelSpec, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    out = [[int(t) for t in p] for p in prompts]
    if not out:
        raise InputError("generate needs at least one prompt")
    for i, p in enumerate(out):
        if not p:
            raise InputError(f"prompt {i} is empty: start it with <|endoftext|> ({EOT}) to generate from nothing")
        if len(p) >= spec.n_positions:
            raise InputError(f"prompt {i} has {len(p)} tokens; the context holds {spec.n_positions}, "
                             "leaving no room to generate")
        bad = [t for t in p if not 0 <= t < spec.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has ids outside [0, {spec.vocab_size}): {bad[:5]}")
    return out


def steps(backend, model: Any, spec: ModelSpec, prompts: Sequence[Sequence[int]], max_new_tokens: int,
          sampling: Sampling = Sampling(), stop: int | None = EOT) -> Iterator[Step]:
    """The steps of generating from `prompts`, as they happen (for streaming)."""
    prompts = check_prompts(spec, prompts)
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lengths = np.array([len(p) for p in prompts])
    end = np.minimum(lengths + max_new_tokens, spec.n_positions)  # each row's last length
    rng = np.random.default_rng(sampling.seed)
    finished = lengths >= end
    pos = int(lengths.min())
    logits, cache = backend.extend(model, np.array([p[:pos] for p in prompts], dtype=np.int64), None, True)
    while not finished.all():
        drawn = next_tokens(logits[:, -1], spec.vocab_size, sampling, rng)
        in_prompt = pos < lengths
        tokens = np.where(in_prompt, [p[pos] if pos < len(p) else 0 for p in prompts], drawn)
        sampled = ~in_prompt & ~finished
        tokens = np.where(finished, stop if stop is not None else 0, tokens)
        finished = finished | (sampled & (pos + 1 >= end))
        if stop is not None:
            finished |= sampled & (tokens == stop)
        yield Step(pos, tokens.astype(np.int64), sampled, finished.copy())
        pos += 1
        if finished.all() or pos >= spec.n_positions:
            break
        logits, cache = backend.extend(model, tokens[:, None].astype(np.int64), cache, True)


def generate(backend, model: Any, spec: ModelSpec, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), stop: int | None = EOT) -> Generation:
    """Each prompt's continuation: up to `max_new_tokens` new ids, ending at `stop` (included)
    or when the context is full."""
    out = Generation([list(p) for p in prompts], [[] for _ in prompts], ["max_new_tokens"] * len(prompts))
    for step in steps(backend, model, spec, prompts, max_new_tokens, sampling, stop):
        for i in np.flatnonzero(step.sampled):
            out.new[i].append(int(step.tokens[i]))
            if stop is not None and step.tokens[i] == stop:
                out.stopped[i] = "stop token"
            elif step.position + 1 >= spec.n_positions and len(out.new[i]) < max_new_tokens:
                out.stopped[i] = "context"
    return out
