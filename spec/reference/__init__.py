"""The executable spec: forward and hand-written backward in float64 numpy.

`forward`, `loss`, `loss_and_grads` and `normalize_weights` take any ModelSpec and dispatch on its
architecture (gpt2.py, ngpt.py), which chain the operators of ops.py. No autodiff: the backward
passes are the derivatives written out, and tests/test_reference.py checks them against central
finite differences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..checks import check_state_shapes, check_targets_array, check_tokens_array
from ..config import ModelSpec
from ..params import param_table
from . import gpt2, ngpt
from .ops import cross_entropy_backward, cross_entropy_forward

_ARCHITECTURES = {"gpt2": gpt2, "ngpt": ngpt}


@dataclass
class LossAndGrads:
    loss: float
    logits: np.ndarray
    grads: dict[str, np.ndarray]  # canonical names and layouts, float64


def _as_f64(spec, params):
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "reference parameters")
    return {n: np.asarray(a, dtype=np.float64) for n, a in params.items()}


def _forward(spec, p, tokens):
    tokens = np.asarray(tokens)
    check_tokens_array(spec, tokens)
    return _ARCHITECTURES[spec.architecture].forward(spec, p, tokens)


def forward(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens) -> np.ndarray:
    """Logits (B, T, vocab_size) in float64."""
    return _forward(spec, _as_f64(spec, params), tokens)[0]


def loss(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets) -> float:
    logits = forward(spec, params, tokens)
    targets = np.asarray(targets)
    check_targets_array(spec, np.shape(tokens), targets)
    return float(cross_entropy_forward(logits, targets)[0])


def loss_and_grads(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets) -> LossAndGrads:
    """Mean cross-entropy, the logits, and the gradient of the loss for every parameter."""
    p = _as_f64(spec, params)
    logits, cache = _forward(spec, p, tokens)
    targets = np.asarray(targets)
    check_targets_array(spec, np.shape(tokens), targets)
    value, ce_cache = cross_entropy_forward(logits, targets)
    grads = _ARCHITECTURES[spec.architecture].backward(spec, p, cache, cross_entropy_backward(ce_cache))
    return LossAndGrads(float(value), logits, {info.name: grads[info.name] for info in param_table(spec)})


def normalize_weights(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The post-step weight normalization (nGPT, SPEC.md 11.3); the identity for other architectures."""
    return ngpt.normalize_weights(spec, _as_f64(spec, params))
