"""What the suite runs: a model (synthetic weights of a preset, or a real checkpoint) and inputs.

Tiers:
- "default": GPT-2 on the small test configs over two seeds and on the full gpt2 (124M) shapes once; every
  other variant on test-mini (two layers) with one seed. Minutes on a laptop CPU.
- "heavy": more seeds, longer sequences, and every GPT-2 preset up to gpt2-xl.
Both tiers also run GPT-2 on a small model trained on Shakespeare (conformance/trained.py): peaked
attention and larger logits, where precision bugs show that random weights hide.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..spec import IGNORE_INDEX, ModelSpec
from ..spec.variants import get_variant
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
    variant: str = "gpt2"     # spec/variants.py: the architecture applied to the preset's size

    @property
    def id(self) -> str:
        source = f"seed{self.seed}" if self.weights is None else f"weights={self.weights}"
        prefix = "" if self.variant == "gpt2" else f"{self.variant}:"
        return f"{prefix}{self.preset}/{source}/B{self.batch}xT{self.length}"

    @property
    def synthetic(self) -> bool:
        return self.weights is None

    @property
    def spec(self) -> ModelSpec:
        if self.weights is not None:
            return self.checkpoint().spec
        return get_variant(self.variant).apply(ModelSpec.preset(self.preset))

    def checkpoint(self) -> Checkpoint:
        return _checkpoint(self.preset, self.variant, self.seed, self.weights)

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


# SPEC.md 18.3: a draw this close (relatively) to its exit probability is moved away, so that rounding
# in a low precision cannot flip an exit decision, a discontinuity no tolerance could absorb.
EXIT_MARGIN = 0.1


def exit_draws(spec: ModelSpec, params, tokens: np.ndarray, seed: int) -> np.ndarray | None:
    """The uniform draws u (n_layer, B, T) of loss="early_exit" (None for other losses): u = r^4, r ~ U(0, 1),
    so that exits happen at the small exit probabilities of untrained weights too, each kept at least
    EXIT_MARGIN (relative) from the reference's exit probability p_max of its layer and position."""
    if spec.loss != "early_exit":
        return None
    from ..spec import reference

    B, T = tokens.shape
    u = np.random.default_rng([seed, 13]).random((spec.n_layer, B, T)) ** 4
    p = reference.exit_probabilities(spec, params, tokens)
    below, above = (1 - EXIT_MARGIN) * p, np.minimum((1 + EXIT_MARGIN) * p, np.nextafter(1.0, 0.0))
    near = np.abs(u - p) < EXIT_MARGIN * p
    return np.where(near, np.where(u < p, below, above), u)


@lru_cache(maxsize=2)
def _checkpoint(preset: str, variant: str, seed: int, weights: str | None) -> Checkpoint:
    if weights is not None:
        return load_checkpoint(weights)
    spec = get_variant(variant).apply(ModelSpec.preset(preset))
    return Checkpoint(
        spec=spec, params=synthetic_params(spec, seed, "conformance"),
        source=f"synthetic:{preset}:{seed} ({variant}, conformance init)", synthetic=True,
    )


def small_cases(seeds=(0, 1), variant: str = "gpt2") -> list[Case]:
    return [c for s in seeds for c in (
        Case("test-tiny", s, batch=3, length=16, variant=variant),   # the whole context
        Case("test-mini", s, batch=2, length=48, variant=variant),   # a prefix of it
    )]


def cases(tier: str = "default", weights: str | None = None, variants=("gpt2",)) -> list[Case]:
    """The suite's cases for a tier and variants; `weights` adds a case on real weights.

    GPT-2 itself runs on the small configs and the full gpt2 shapes; another variant runs on the
    small configs, and in the heavy tier on the gpt2 shapes too.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {TIERS}")
    out = []
    for variant in variants:
        get_variant(variant)  # unknown names fail here, clearly
        if tier == "default":  # GPT-2 over two seeds and both sizes; each other variant on test-mini, one seed
            if variant == "gpt2":
                out += small_cases(seeds=(0, 1)) + [Case("gpt2", 0, batch=1, length=64)]
            else:  # test-mini: two layers, so sharing, layer losses and stop-gradients are exercised
                out += [c for c in small_cases(seeds=(0,), variant=variant) if c.preset == "test-mini"]
        else:
            out += small_cases(seeds=range(5), variant=variant) + [
                Case("gpt2", 0, batch=2, length=128, variant=variant),
                Case("gpt2", 1, batch=1, length=1024, variant=variant),
            ]
            if variant == "gpt2":
                out += [Case(p, 0, batch=1, length=32) for p in ("gpt2-medium", "gpt2-large", "gpt2-xl")]
    if "gpt2" in variants:  # a trained checkpoint beside the synthetic weights (conformance/trained.py)
        from .trained import trained_cases  # here: trained.py builds on this module

        out += trained_cases(tier)
    if weights is not None:
        out.append(Case("gpt2", 0, batch=2, length=64, weights=weights))
    return out
