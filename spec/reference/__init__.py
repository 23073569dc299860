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

from ..checks import check_draws_array, check_state_shapes, check_targets_array, check_tokens_array
from ..config import ModelSpec
from ..errors import SpecError
from ..params import param_table
from . import conditioning, gpt2, ngpt
from .ops import cross_entropy_backward, cross_entropy_forward

_ARCHITECTURES = {"gpt2": gpt2, "ngpt": ngpt}


@dataclass
class LossAndGrads:
    loss: float
    logits: np.ndarray
    grads: dict[str, np.ndarray]  # canonical names and layouts, float64


def _as_f64(spec, params):
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "reference parameters")
    # asany: conditioning.py's Noisy parameters stay Noisy (a training run's condition estimate)
    return {n: np.asanyarray(a, dtype=np.float64) for n, a in params.items()}


def _forward(spec, p, tokens):
    tokens = np.asarray(tokens)
    check_tokens_array(spec, tokens)
    return _ARCHITECTURES[spec.architecture].forward(spec, p, tokens)


def forward(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens) -> np.ndarray:
    """Logits (B, T, vocab_size) in float64."""
    return _forward(spec, _as_f64(spec, params), tokens)[0]


def loss(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets, draws=None) -> float:
    """The spec's loss (SPEC.md 4 and 18); `draws`: the (n_layer, B, T) uniforms of loss="early_exit"."""
    return loss_and_grads(spec, params, tokens, targets, draws).loss


def loss_and_grads(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets, draws=None) -> LossAndGrads:
    """The loss (SPEC.md 4 and 18), the last layer's logits, and the gradient of the loss for every parameter."""
    p = _as_f64(spec, params)
    tokens, targets = np.asarray(tokens), np.asarray(targets)
    check_tokens_array(spec, tokens)
    check_targets_array(spec, tokens.shape, targets)
    check_draws_array(spec, tokens.shape, draws)
    if spec.architecture == "gpt2":
        value, logits, grads = gpt2.loss_and_grads(spec, p, tokens, targets, None if draws is None else
                                                   np.asarray(draws, np.float64))
    else:
        logits, cache = ngpt.forward(spec, p, tokens)
        value, ce_cache = cross_entropy_forward(logits, targets)
        grads = ngpt.backward(spec, p, cache, cross_entropy_backward(ce_cache))
    return LossAndGrads(float(value), logits, {info.name: grads[info.name] for info in param_table(spec)})


def exit_probabilities(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens) -> np.ndarray:
    """(n_layer, B, T): each layer's max softmax probability, which loss="early_exit" compares with its draws."""
    if spec.architecture != "gpt2":
        raise SpecError(f"exit probabilities are defined for architecture='gpt2', not {spec.architecture!r}")
    tokens = np.asarray(tokens)
    check_tokens_array(spec, tokens)
    return gpt2.exit_probabilities(spec, _as_f64(spec, params), tokens)


def residual_stats(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens) -> dict[str, np.ndarray]:
    """SPEC.md 18.4, the seed's "SIZE COMPARISON": per layer (n_layer,), the mean over positions of the
    Bessel-corrected std over channels of each block's input, intermediate stream, output, and ln_f(output)."""
    if spec.architecture != "gpt2":
        raise SpecError(f"residual_stats are defined for architecture='gpt2' (SPEC.md 18.4), not {spec.architecture!r}")
    tokens = np.asarray(tokens)
    check_tokens_array(spec, tokens)
    return gpt2.residual_stats(spec, _as_f64(spec, params), tokens)


def condition(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets, draws=None,
              off_sphere: Mapping[str, np.ndarray] | None = None, samples: int = 4, seed=0) -> dict[str, tuple]:
    """SPEC.md 9: the condition estimates (kappa_l2, kappa_max, eta_l2, eta_max) of every tensor a conformance
    check compares, by Monte Carlo arithmetic (conditioning.py): its errors per unit roundoff of every
    operation (kappa), and per unit of absolute error where an operation's result underflows (eta). Named as
    the checks name them: "logits", "loss", each parameter's gradient, "residual <row>" (architecture gpt2)
    and, given the off-sphere weights of the normalization check, "normalized <name>"."""
    p = _as_f64(spec, params)
    q = None if off_sphere is None else _as_f64(spec, off_sphere)
    tokens, targets = np.asarray(tokens), np.asarray(targets)
    check_tokens_array(spec, tokens)
    check_targets_array(spec, tokens.shape, targets)
    check_draws_array(spec, tokens.shape, draws)
    draws = None if draws is None else np.asarray(draws, np.float64)
    names = [info.name for info in param_table(spec)]

    def compute(perturbed: bool) -> dict[str, np.ndarray]:
        pp = conditioning.noisy(p) if perturbed else p
        out = {}
        if spec.architecture == "gpt2":
            value, logits, grads = gpt2.loss_and_grads(spec, pp, tokens, targets, draws)
            out.update((f"residual {k}", v) for k, v in gpt2.residual_stats(spec, pp, tokens).items())
        else:
            logits, cache = ngpt.forward(spec, pp, tokens)
            value, ce_cache = cross_entropy_forward(logits, targets)
            grads = ngpt.backward(spec, pp, cache, cross_entropy_backward(ce_cache))
        out.update(logits=logits, loss=value, **{n: grads[n] for n in names})
        if q is not None:
            normalized = ngpt.normalize_weights(spec, conditioning.noisy(q) if perturbed else q)
            out.update((f"normalized {n}", normalized[n]) for n in names)
        return out

    exact = compute(False)
    relative = conditioning.estimate(compute, samples, seed, exact=exact)
    # float16's gradients of ~1e-5 are subnormal (below 6.1e-5): an absolute error (SPEC.md 9)
    absolute = conditioning.estimate(compute, max(2, samples // 2), seed, conditioning.ETA, absolute=True,
                                     exact=exact)
    return {n: relative[n] + absolute[n] for n in relative}


def normalize_weights(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The post-step weight normalization (nGPT, SPEC.md 11.3); the identity for other architectures."""
    return ngpt.normalize_weights(spec, _as_f64(spec, params))


# The training loop (SPEC.md 20) calls loss_and_grads and normalize_weights above: imported after them.
from .training import TrainResult, TrainState, load_state, save_state, train  # noqa: E402
