"""The numeric tolerance policy (SPEC.md, "Tolerance policy"), read from tolerances.json.

Two error metrics, both relative so that one bound fits every model size:

    rel_l2   = ||x - ref||_2 / ||ref||_2          the error's overall size
    rel_max  = max|x - ref| / max|ref|            the largest single error, against the tensor's scale

(`errors` computes both; the conformance checks and the reference's condition estimates use it.)

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
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from .checks import canonical_dtype

TOLERANCES_FILE = Path(__file__).with_name("tolerances.json")
QUANTITIES = ("logits", "loss", "grads", "weights", "stats", "exit_loss", "exit_grads")
METRICS = ("rel_l2", "rel_max")
PAIRWISE_FACTOR = 2.0
# unit roundoff of each dtype: half the distance from 1 to the next number (SPEC.md 9)
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
# the absolute error of a result in the dtype's subnormal range: half its smallest subnormal (SPEC.md 9)
UNDERFLOW = {"float32": 2.0 ** -150, "bfloat16": 2.0 ** -134, "float16": 2.0 ** -25}
# a training precision's unit roundoff: that of the dtype its forward and backward compute in (SPEC.md 20.9)
PRECISION_ROUNDOFF = {"float32": 2.0 ** -24, "mixed_bfloat16": 2.0 ** -8}
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


def is_conditioned() -> bool:
    """Whether the file holds the per-tensor constants of the conditioned bounds (SPEC.md 9)."""
    return "conditioned" in policy()


def effective_kappa(dtype: str, metric: str, estimates) -> float:
    """The condition estimate of one metric in `dtype`, in units of its unit roundoff: the relative part and,
    where the reference measured it, the underflow part, added as independent errors add (SPEC.md 9).
    `estimates`: (kappa_l2, kappa_max) or (kappa_l2, kappa_max, eta_l2, eta_max)."""
    i = METRICS.index(metric)
    kappa = estimates[i]
    if len(estimates) == 2:
        return kappa
    dtype = canonical_dtype(dtype)
    return float((kappa ** 2 + (UNDERFLOW[dtype] / UNIT_ROUNDOFF[dtype] * estimates[2 + i]) ** 2) ** 0.5)


def conditioned_bound(dtype: str, quantity: str, metric: str, kappa: float, pairwise: bool = False) -> float:
    """SPEC.md 9: the bound of one tensor, c(dtype, quantity, metric) x u(dtype) x kappa, where kappa is that
    tensor's condition estimate (spec/reference/conditioning.py) for the metric."""
    dtype = canonical_dtype(dtype)
    return _conditioned(policy().get("conditioned", {}), (dtype, quantity, metric), UNIT_ROUNDOFF[dtype] * kappa,
                        pairwise, "--conditioned")


def _conditioned(section: dict, key: tuple[str, str, str], scale: float, pairwise: bool, option: str) -> float:
    """c(key) x scale (u x kappa), twice that pairwise; a missing constant names the calibration that measures it."""
    try:
        c = section["constants"][key[0]][key[1]][key[2]]
    except KeyError:
        raise KeyError(f"{TOLERANCES_FILE} has no conditioned constant for {' '.join(key)}: "
                       f"measure it with python -m gptspec.conformance.calibrate {option}") from None
    return c * scale * (PAIRWISE_FACTOR if pairwise else 1.0)


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


def trajectory_is_conditioned(precision: str, quantity: str) -> bool:
    """Whether the training checks of (precision, quantity) use conditioned bounds: those the calibration
    adopted, where the estimate predicts the errors at least as well as the per-horizon bounds (SPEC.md 20.11)."""
    section = policy().get("trajectory", {}).get("conditioned")
    return section is not None and [precision, quantity] in section.get("adopted", [])


def trajectory_conditioned_bound(precision: str, quantity: str, metric: str, kappa: float,
                                 pairwise: bool = False) -> float:
    """SPEC.md 9 and 20.11: the bound of one training check, c(precision, quantity, metric) x u(precision) x kappa,
    kappa its condition estimate through the steps it follows (conformance/trajectory.py)."""
    return _conditioned(policy().get("trajectory", {}).get("conditioned", {}), (precision, quantity, metric),
                        PRECISION_ROUNDOFF[precision] * kappa, pairwise, "--trajectories --conditioned")


# -- the metrics (SPEC.md 9, "What is compared") ---------------------------------------------------------
#: elements per block of `errors`: its float64 temporaries stay in cache, where whole-tensor ones (a gpt2
#: gradient is 124M elements, 1 GB in float64) were fresh pages on every call: ~20x faster on gpt2
ERROR_BLOCK = 1 << 16


def errors(x: np.ndarray, ref: np.ndarray, *, since: tuple[np.ndarray, np.ndarray] | None = None,
           keep: np.ndarray | None = None) -> tuple[float, float, float]:
    """(rel_l2, rel_max, max_abs) of x against ref, in float64. A zero reference needs a zero x.
    A NaN or Inf on either side makes rel_l2 NaN or Inf. Sums of squares are accumulated block by block,
    so rel_l2 may differ from a whole-array dot product's in its last digits (at most 2.2e-12 relative
    over the main job's checks); the maxima are exact.
    `since` = (x0, ref0): the changes x - x0 and ref - ref0 are compared instead, each formed in float64
    block by block (a gpt2 weight change is 1 GB in float64 as a whole array); `keep`: a mask of the
    elements compared (the others count as zero on both sides, which leaves every metric as it is)."""
    x, ref = np.asarray(x), np.asarray(ref)
    # blocks of rows in the arrays' own layout (a transposed gradient is not copied to flatten it); sums by
    # einsum, not BLAS: a BLAS dot per block woke its threads every time, ~40x slower beside another process
    rows = (x.shape[0], -1) if x.ndim and x.size else (1, x.size)
    x, ref = x.reshape(rows), ref.reshape(rows)
    x0, ref0 = (None, None) if since is None else (np.asarray(a).reshape(rows) for a in since)
    dropped = None if keep is None else ~np.asarray(keep).reshape(rows)
    step = max(1, ERROR_BLOCK // max(1, x.shape[1]))
    sq_diff = sq_ref = 0.0
    diff_max, ref_max = [0.0], [0.0]
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: the NaN is the answer, not a warning
        for i in range(0, x.shape[0], step):
            a, r = x[i:i + step], ref[i:i + step]
            if since is not None:
                a = np.subtract(a, x0[i:i + step], dtype=np.float64)
                r = np.subtract(r, ref0[i:i + step], dtype=np.float64)
            if dropped is not None:
                a, r = (np.where(dropped[i:i + step], 0.0, v) for v in (a, r))
            d = np.subtract(a, r, dtype=np.float64)
            sq_diff += float(np.einsum("ij,ij->", d, d))
            sq_ref += float(np.einsum("ij,ij->", r, r, dtype=np.float64))
            diff_max.append(float(np.abs(d, out=d).max(initial=0.0)))
            ref_max.append(max(float(r.max(initial=0.0)), -float(r.min(initial=0.0))))
    max_abs, ref_peak = float(np.max(diff_max)), float(np.max(ref_max))  # np.max keeps a NaN; max() would drop it
    ref_l2 = math.sqrt(sq_ref)
    rel_l2 = math.sqrt(sq_diff) / ref_l2 if ref_l2 else (0.0 if max_abs == 0 else math.inf)
    rel_max = max_abs / ref_peak if ref_peak else (0.0 if max_abs == 0 else math.inf)
    return rel_l2, rel_max, max_abs
