"""The numeric tolerance policy (SPEC.md, "Tolerance policy"), read from tolerances.json.

Two error metrics, both relative so that one bound fits every model size:

    rel_l2   = ||x - ref||_2 / ||ref||_2          the error's overall size
    rel_max  = max|x - ref| / max|ref|            the largest single error, against the tensor's scale

A check passes when both metrics are within the bound of its (dtype, quantity), where quantity is
"logits", "loss", "grads" (every parameter's gradient), "weights" (weights after the post-step
normalization of SPEC.md 11.3), "stats" (the residual-stream statistics of SPEC.md 18.4), or
"exit_loss" and "exit_grads", the loss and gradients of loss="early_exit" (SPEC.md 18.3), whose
conditioning differs from the cross-entropy's. Comparisons between two backends use
twice the bound: each is within the bound of the reference, so by the triangle inequality they
are within twice of each other. The bounds come from measurement (conformance/calibrate.py):
each is the measured maximum times a factor between 2 and 10.

Training (SPEC.md 20.11) has bounds of its own under the file's "trajectory" key, per training
precision (float32, mixed_bfloat16), per step horizon and per quantity: "train_loss" and
"train_grad_norm" (each step's loss and pre-clip gradient norm), "train_weights" (each tensor's weight
change w_k - w_0), "train_m" and "train_v" (the AdamW moments). A check at step s (or of the state
after s steps) uses the bound of the smallest calibrated horizon >= s: errors grow with the steps.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .checks import canonical_dtype

TOLERANCES_FILE = Path(__file__).with_name("tolerances.json")
QUANTITIES = ("logits", "loss", "grads", "weights", "stats", "exit_loss", "exit_grads")
METRICS = ("rel_l2", "rel_max")
PAIRWISE_FACTOR = 2.0
TRAJECTORY_QUANTITIES = ("train_loss", "train_grad_norm", "train_weights", "train_m", "train_v")


@lru_cache(maxsize=1)
def policy() -> dict:
    return json.loads(TOLERANCES_FILE.read_text())


def bound(dtype: str, quantity: str, metric: str, pairwise: bool = False) -> float:
    try:
        b = policy()["bounds"][canonical_dtype(dtype)][quantity][metric]
    except KeyError:
        raise KeyError(
            f"{TOLERANCES_FILE} has no bound for {dtype} {quantity} {metric}: "
            "re-measure with python -m gptspec.conformance.calibrate"
        ) from None
    return b * PAIRWISE_FACTOR if pairwise else b


def horizon(steps: int) -> int:
    """The smallest calibrated step horizon >= steps, whose bounds hold for step `steps` of a run."""
    horizons = sorted(int(h) for h in policy().get("trajectory", {}).get("horizons", ()))
    for h in horizons:
        if steps <= h:
            return h
    raise KeyError(
        f"{TOLERANCES_FILE} has no trajectory bounds for step {steps} (calibrated horizons: {horizons or 'none'}): "
        "measure with python -m gptspec.conformance.calibrate --trajectories"
    )


def trajectory_bound(precision: str, steps: int, quantity: str, metric: str, pairwise: bool = False) -> float:
    """The bound of a training check at step `steps` (SPEC.md 20.11)."""
    h = horizon(steps)
    try:
        b = policy()["trajectory"]["bounds"][precision][str(h)][quantity][metric]
    except KeyError:
        raise KeyError(
            f"{TOLERANCES_FILE} has no trajectory bound for {precision} {quantity} {metric} at horizon {h}: "
            "measure with python -m gptspec.conformance.calibrate --trajectories"
        ) from None
    return b * PAIRWISE_FACTOR if pairwise else b
