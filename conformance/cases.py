"""What the suite runs: a model (synthetic weights of a preset, or a real checkpoint) and inputs.

Tiers:
- "default": the small test configs over two seeds each, and the full gpt2 (124M) shapes
  once. Minutes on a laptop CPU.
- "heavy": more seeds, longer sequences, and every GPT-2 preset up to gpt2-xl.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..spec import IGNORE_INDEX, ModelSpec
from ..weights import Checkpoint, load_checkpoint
from ..weights.synthetic import synthetic_params

TIERS = ("default", "heavy")

# Inputs for real checkpoints: natural text rather than random ids.
_TEXT = (
    "The quick brown fox jumps over the lazy dog. GPT-2 is a transformer language model that was "
    "trained on the WebText corpus, forty gigabytes of text from outbound Reddit links. It predicts "
    "the next token given all of the previous tokens, one position at a time, using masked "
    "self-attention over a context of up to one thousand and twenty-four tokens. Conformance means "
    "that every framework computes the same logits, the same loss and the same gradients."
)


@dataclass(frozen=True)
class Case:
    preset: str               # the model size (a ModelSpec preset)
    seed: int = 0             # seed of the synthetic weights and of the inputs
    batch: int = 2
    length: int = 16
    weights: str | None = None  # a name or path of real weights; None = synthetic "conformance" init

    @property
    def id(self) -> str:
        source = f"seed{self.seed}" if self.weights is None else f"weights={self.weights}"
        return f"{self.preset}/{source}/B{self.batch}xT{self.length}"

    @property
    def synthetic(self) -> bool:
        return self.weights is None

    def checkpoint(self) -> Checkpoint:
        return _checkpoint(self.preset, self.seed, self.weights)

    def inputs(self, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, targets), int64 (B, T). Targets skip every 7th position (the ignore index)."""
        B, T = self.batch, self.length
        if self.weights is not None and spec.vocab_size == 50257:
            from ..tokenizer import get_encoding

            ids = np.array(get_encoding("gpt2").encode(_TEXT), dtype=np.int64)
            need = B * (T + 1)
            ids = np.resize(ids, need).reshape(B, T + 1)
            tokens, targets = ids[:, :T].copy(), ids[:, 1:].copy()
        else:
            rng = np.random.default_rng([self.seed, 7])
            tokens = rng.integers(0, spec.vocab_size, (B, T), dtype=np.int64)
            targets = rng.integers(0, spec.vocab_size, (B, T), dtype=np.int64)
        targets.reshape(-1)[3::7] = IGNORE_INDEX
        return tokens, targets


@lru_cache(maxsize=2)
def _checkpoint(preset: str, seed: int, weights: str | None) -> Checkpoint:
    if weights is not None:
        return load_checkpoint(weights)
    spec = ModelSpec.preset(preset)
    return Checkpoint(
        spec=spec, params=synthetic_params(spec, seed, "conformance"),
        source=f"synthetic:{preset}:{seed} (conformance init)", synthetic=True,
    )


def small_cases(seeds=(0, 1)) -> list[Case]:
    return [c for s in seeds for c in (
        Case("test-tiny", s, batch=3, length=16),   # the whole context
        Case("test-mini", s, batch=2, length=48),   # a prefix of it
    )]


def cases(tier: str = "default", weights: str | None = None) -> list[Case]:
    """The suite's cases for a tier; `weights` adds (default) or substitutes real weights for gpt2."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {TIERS}")
    if tier == "default":
        out = small_cases() + [Case("gpt2", 0, batch=1, length=64)]
    else:
        out = small_cases(seeds=range(5)) + [
            Case("gpt2", 0, batch=2, length=128),
            Case("gpt2", 1, batch=1, length=1024),
            Case("gpt2-medium", 0, batch=1, length=32),
            Case("gpt2-large", 0, batch=1, length=32),
            Case("gpt2-xl", 0, batch=1, length=32),
        ]
    if weights is not None:
        out.append(Case("gpt2", 0, batch=2, length=64, weights=weights))
    return out
