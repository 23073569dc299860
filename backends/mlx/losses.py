"""The spec's losses (SPEC.md 4 and 18) in MLX, in float32 whatever the logits' dtype, and the
float32 accuracy they need: MLX's CPU reductions add one term at a time, so long sums are taken
in blocks and means as an estimate plus a correction."""
from __future__ import annotations

import math

import mlx.core as mx

from ...spec import IGNORE_INDEX


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over targets != IGNORE_INDEX, computed in float32 whatever the logits' dtype."""
    logits = logits.astype(mx.float32)
    counted = targets != IGNORE_INDEX
    picked = mx.take_along_axis(logits, mx.where(counted, targets, 0)[..., None], axis=-1).squeeze(-1)
    return masked_mean(logsumexp(logits) - picked, counted)


def early_exit_loss(layer_logits: list[mx.array], targets: mx.array, draws: mx.array) -> mx.array:
    """SPEC.md 18.3, in float32 whatever the logits' dtype. Position (b, t) exits at layer l when
    draws[l] < p_max_l (the last layer exits all still active); each layer adds, over the counted
    positions, active * factor * conf / n_counted with conf = -log(1 - p_max) and factor = the
    cross-entropy at the exit layer, else 1. Exits and the active mask are decisions: no gradient."""
    counted = targets != IGNORE_INDEX
    ids = mx.where(counted, targets, 0)[..., None]
    active = mx.ones(targets.shape, dtype=mx.bool_)
    total = mx.array(0.0)
    for layer, z in enumerate(layer_logits):
        z = z.astype(mx.float32)
        # p_max = 1 / s with s = sum exp(z - max): the log p_max = max - logsumexp form would lose
        # ~ulp(logsumexp) of it, relatively, where p_max is small (untrained weights). The max keeps
        # its gradient: p_max depends on it.
        peak = z.max(axis=-1)
        s = blocked_sum(mx.exp(z - peak[..., None]))
        p_max = 1 / s
        conf = -mx.log1p(-p_max)
        xe = mx.log(s) + (peak - mx.take_along_axis(z, ids, axis=-1).squeeze(-1))
        exits = draws[layer] < mx.stop_gradient(p_max) if layer < len(layer_logits) - 1 else mx.ones_like(active)
        factor = mx.where(active & exits, xe, 1.0)
        total = total + masked_mean(mx.where(active, factor * conf, 0.0), counted)
        active = active & ~exits
    return total


def masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    """The mean of x where mask, as a first estimate plus the mean of what it missed.

    A plain float32 sum of ~100 losses of ~7 was off by up to 1.7e-7 of its value (the loss bound
    is 2e-7; torch's loss of the same logits was off by 2e-8). The deviations from a first estimate
    are small numbers with small rounding errors, which leaves the one rounding of the result.
    """
    n = mask.sum()
    estimate = mx.stop_gradient((x * mask).sum() / n)
    return estimate + ((x - estimate) * mask).sum() / n


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis, with the max subtracted and the sum taken in blocks."""
    peak = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(blocked_sum(mx.exp(x - peak))) + peak.squeeze(-1)


def blocked_sum(x: mx.array) -> mx.array:
    """Sum over the last axis as ~sqrt(n) sums of ~sqrt(n) terms.

    MLX's CPU reductions add one term at a time: over GPT-2's 50257 logits a float32 sum was off by
    up to 8.5e-6 of its value (biased low; torch's: 1.3e-7), which put the loss 2.4e-7 off against a
    bound of 2e-7 (SPEC.md section 9). In two levels of ~sqrt(n) terms it is off by at most 7.5e-7.
    """
    n = x.shape[-1]
    k = math.isqrt(n - 1) + 1 if n > 1 else 1
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k * k - n)])
    return padded.reshape(*x.shape[:-1], k, k).sum(axis=-1).sum(axis=-1)
