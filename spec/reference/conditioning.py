"""Condition estimates of the reference's outputs by Monte Carlo arithmetic (SPEC.md 9).

Every floating-point operation of the reference (each ufunc call: an elementwise op, a reduction,
a matrix product) has its result multiplied by (1 + delta * r), r uniform in [-1, 1] and drawn per
element: the model of a rounding to nearest with unit roundoff delta. Running the unchanged reference
this way and measuring each output's relative error against the exact run gives that output's
sensitivity to rounding, its condition estimate kappa = error / delta: how many unit roundoffs of
error an implementation that rounds every operation once should show. A gradient that is a sum of
large cancelling terms (a layer-0 LayerNorm bias on a short sequence) gets a large kappa; a logit a
small one. The perturbation is linear in delta (delta = 2^-30 keeps it far above float64's own
rounding and far below where second-order terms show), so kappa does not depend on delta, and one
estimate serves every dtype: the bound of a check is c(quantity, dtype) * u(dtype) * kappa.

Exact operations (max, min, negation, absolute value, comparisons) are not perturbed: they do not
round. Structural functions (where, concatenate, take_along_axis, ...) move values without
arithmetic and keep them perturbable.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..tolerance import errors

DELTA = 2.0 ** -30
# gradual underflow's absolute error: small enough to stay first order on the smallest gradients (~1e-7), large
# enough to survive float64's rounding of them; on values above ~1e-2 it is lost, as the dtype's is there
ETA = 2.0 ** -50

# ufuncs whose float results are exact (no rounding), so an implementation adds no error there
_EXACT = {np.maximum, np.minimum, np.fmax, np.fmin, np.negative, np.positive, np.absolute, np.sign,
          np.floor, np.ceil, np.trunc, np.rint, np.copysign}

_state: dict = {"rng": None, "delta": 0.0, "pool": None, "absolute": False}


class Noisy(np.ndarray):
    """An array whose every floating-point operation rounds randomly (while a `perturbed` block runs)."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        inputs = tuple(_plain(x) for x in inputs)
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        exact = ufunc in _EXACT or method in ("at",)
        if method == "reduce" and ufunc in (np.maximum, np.minimum, np.logical_and, np.logical_or):
            exact = True
        if isinstance(result, tuple):
            return tuple(_noisy(r, exact) for r in result)
        return None if result is None else _noisy(result, exact)

    def __array_function__(self, func, types, args, kwargs):
        # numpy's own implementation on the subclass: arithmetic inside it goes through the ufuncs
        # above; what comes back as a plain float array (np.where, ...) is made perturbable again
        result = super().__array_function__(func, types, args, kwargs)
        return _rewrap(result)


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, Noisy) else x


def _rewrap(result):
    if isinstance(result, (list, tuple)):
        return type(result)(_rewrap(r) for r in result)
    if isinstance(result, np.ndarray) and not isinstance(result, Noisy) and result.dtype.kind == "f":
        return result.view(Noisy)
    return result


def _noisy(result, exact: bool):
    """The rounded result of one operation: a float array (or scalar) times (1 + delta r), r ~ U[-1, 1]."""
    arr = np.asarray(result)
    if arr.dtype.kind != "f":
        return result
    if _state["rng"] is not None and not exact:
        window = _factors(arr.size).reshape(arr.shape)  # 1 + delta r, or, `absolute`, delta r
        in_place = isinstance(result, np.ndarray) and arr.ndim  # an `out=` operand must stay the array written
        if not _state["absolute"]:
            arr = np.multiply(arr, window, out=arr if in_place else None)
        elif in_place:  # an underflow's error: absolute, and only where the result is not exactly 0
            np.add(arr, window, out=arr, where=arr != 0)
        else:
            arr = arr + window * (arr != 0)
    return arr.view(Noisy)


_POOL = 1 << 22


@functools.lru_cache(maxsize=3)  # DELTA's factors, ETA's offsets and the factors they come from
def _pool(delta: float, absolute: bool = False) -> np.ndarray:
    """The factors 1 + delta r of a relative perturbation, or (`absolute`) the offsets delta r, each one's
    value exactly (1 + delta r) - 1 of the same draw."""
    if absolute:
        return _pool(delta) - 1.0
    return 1.0 + delta * np.random.default_rng(20261130).uniform(-1.0, 1.0, _POOL)


def _factors(n: int) -> np.ndarray:
    """n factors 1 + delta r: a window, at a random offset, of a pool drawn once (drawing every
    operation's own uniforms cost 7x the reference's time on gpt2 shapes; windows of one pool are as
    good for a condition estimate, where only the errors' sizes matter, not their independence)."""
    pool = _state["pool"]
    if n > len(pool):  # e.g. gpt2 logits beyond 83 positions: the pool repeats
        return np.tile(pool, -(-n // len(pool)))[:n]
    start = int(_state["rng"].integers(len(pool) - n + 1))
    return pool[start:start + n]


@contextlib.contextmanager
def perturbed(seed, delta: float = DELTA, absolute: bool = False):
    """Within the block, operations on Noisy arrays round randomly with unit roundoff `delta` (relative), or,
    `absolute`, with an absolute error of up to `delta` wherever their result is not 0 (gradual underflow)."""
    saved = dict(_state)
    _state.update(rng=np.random.default_rng(seed), delta=delta, pool=_pool(delta, absolute), absolute=absolute)
    try:
        yield
    finally:
        _state.update(saved)


def noisy(params):
    """The parameters as Noisy views (same values, no copy): the reference run on them is perturbed."""
    return {n: np.asarray(a, np.float64).view(Noisy) for n, a in params.items()}


def estimate(compute, samples: int = 3, seed=0, delta: float = DELTA, absolute: bool = False,
             exact: dict | None = None) -> dict[str, tuple[float, float]]:
    """Per output of `compute(noisy)` (a dict of name -> array, computed from the parameters made Noisy
    when `noisy`): (kappa_l2, kappa_max), the root mean square over `samples` perturbed runs of its
    rel_l2 and rel_max errors against the exact run (`exact`, or computed), in units of delta. Several
    samples because one perturbed run of a scalar (the loss) is one draw of a random error that may land
    near zero. `absolute`: the perturbation of underflow (see `perturbed`), whose kappa is in units of an
    absolute delta."""
    exact = {n: np.asarray(a, np.float64) for n, a in (exact or compute(False)).items()}
    sums = {n: np.zeros(2) for n in exact}
    for s in range(samples):
        with perturbed([*np.atleast_1d(seed), s, int(absolute)], delta, absolute):
            out = compute(True)
        for n, ref in exact.items():
            x = np.asarray(out[n].view(np.ndarray) if isinstance(out[n], Noisy) else out[n], np.float64)
            sums[n] += np.square(errors(x, ref)[:2])  # rel_l2, rel_max: the checks' own metrics
    return {n: tuple(float(v) for v in np.sqrt(sq / samples) / delta) for n, sq in sums.items()}
