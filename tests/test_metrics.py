"""The metrics of SPEC.md 9 (spec.tolerance.errors, which conformance.metrics uses) work block by block; checked
here against whole-array numpy (the oracle)."""
import math

import numpy as np
import pytest

from gptspec.conformance.metrics import compare, errors
from gptspec.spec.tolerance import ERROR_BLOCK

FIELDS = dict(case="c", subject="s", device="cpu", dtype="float32", quantity="grads", tensor="t")


def oracle(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    diff = x - ref
    max_abs = np.abs(diff).max()
    return np.linalg.norm(diff) / np.linalg.norm(ref), max_abs / np.abs(ref).max(), max_abs


@pytest.mark.parametrize("x_dtype,ref_dtype", [("float32", "float64"), ("float32", "float32"), ("float64", "float64")])
def test_errors_match_whole_array_numpy_across_blocks(x_dtype, ref_dtype):
    rng = np.random.default_rng(0)
    n = 3 * ERROR_BLOCK + 123  # several blocks and a ragged last one
    ref = (rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(ref_dtype).reshape(-1, 1)
    ref[2 * ERROR_BLOCK + 5, 0] = 1e3  # the reference's peak in the third block
    x = (ref * (1 + 1e-5 * rng.standard_normal(ref.shape))).astype(x_dtype)
    x[-1, 0] = ref[-1, 0] + 7.0  # the largest difference in the last, partial one
    got, want = errors(x, ref), oracle(x, ref)
    assert got[1:] == pytest.approx(want[1:], rel=0, abs=0)  # maxima are exact whatever the order
    assert got[0] == pytest.approx(want[0], rel=1e-13)
    assert got[2] == pytest.approx(7.0, rel=1e-6)


def test_errors_follow_each_arrays_layout():
    """A transposed gradient (a view, column-major) against a row-major reference: element by element."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((300, 700))
    x = np.ascontiguousarray((ref + 1e-3 * rng.standard_normal(ref.shape)).T).T.astype(np.float32)
    assert not x.flags.c_contiguous
    got, want = errors(x, ref), oracle(x, ref)
    assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], rel=1e-13)
    assert errors(np.float32(2.0), np.float64(1.0)) == (1.0, 1.0, 1.0)  # a scalar (the loss)
    assert errors(np.zeros((0, 3), np.float32), np.zeros((0, 3))) == (0.0, 0.0, 0.0)


def test_zero_reference_needs_zero_x():
    assert errors(np.zeros(4, np.float32), np.zeros(4)) == (0.0, 0.0, 0.0)
    rel_l2, rel_max, max_abs = errors(np.array([0, 0, 2.0], np.float32), np.zeros(3))
    assert (rel_l2, rel_max, max_abs) == (math.inf, math.inf, 2.0)
    check = compare(np.array([0, 0, 2.0]), np.zeros(3), **FIELDS)
    assert not check.ok and check.note == ""  # an error, not a NaN


@pytest.mark.parametrize("where", ["backend", "reference"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ref_is_zero", [False, True])
def test_a_nan_or_inf_on_either_side_is_named(where, bad, ref_is_zero):
    n = ERROR_BLOCK + 10
    ref = np.zeros(n) if ref_is_zero else np.linspace(1, 2, n)
    x = ref.astype(np.float32)
    side = x if where == "backend" else ref
    side[n - 3] = bad  # in the second block: a blockwise maximum must not drop it
    check = compare(x, ref, **FIELDS)
    assert check.note == f"{'NaN' if np.isnan(bad) else 'Inf'} in {where}"
    assert not check.ok


def test_the_same_inf_on_both_sides_is_still_named():
    x = np.array([np.inf, 1.0])
    assert compare(x, x.copy(), **FIELDS).note == "Inf in backend"


@pytest.mark.parametrize("transposed", [False, True])
def test_changes_are_compared_as_the_whole_differences_would_be(transposed):
    """since=(x0, ref0) compares x - x0 with ref - ref0 (the training checks' weight changes), formed block by
    block in float64; keep leaves out the other elements. Oracle: the whole float64 differences, masked."""
    rng = np.random.default_rng(2)
    shape = (3 * ERROR_BLOCK // 512 + 7, 512)  # several blocks of rows, a ragged last one
    start = rng.standard_normal(shape).astype(np.float32)  # the float32 start both sides move from
    ref = start + 1e-3 * rng.standard_normal(shape)  # float64, as the reference's state
    x = (ref + 1e-8 * rng.standard_normal(shape)).astype(np.float32)
    if transposed:  # each in its own layout: a view of the start, a row-major reference, a column-major state
        start, ref, x = start.T, np.ascontiguousarray(ref.T), np.asfortranarray(x.T)
    keep = rng.random(start.shape) > 0.3
    x[~keep] = np.nan  # never seen: the dropped elements count as zero on both sides
    want = oracle(np.where(keep, x.astype(np.float64) - start, 0), np.where(keep, ref - start, 0))
    got = errors(x, ref, since=(start, start), keep=keep)
    assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], rel=1e-13)
    assert errors(x[keep], ref[keep]) != got  # the changes, not the weights
    check = compare(x, ref, since=(start, start), keep=keep, **FIELDS)
    assert check.ok is (got[0] <= check.bound_l2 and got[1] <= check.bound_max) and check.note == ""
    x.flat[np.flatnonzero(keep)[-1]] = np.inf  # now a kept one: named as what it is, not as a dropped NaN
    check = compare(x, ref, since=(start, start), keep=keep, **FIELDS)
    assert check.note == "Inf in backend" and not check.ok
