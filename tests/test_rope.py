"""spec/rope.py, the RoPE table every backend shares, against its closed form (SPEC.md 11.2)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gptspec.spec.rope import rope_angles


@pytest.mark.parametrize("n, d, base", [(8, 4, 10000.0), (1024, 64, 10000.0), (33, 6, 500.0)])
def test_angles_are_the_closed_form(n, d, base):
    cos, sin = rope_angles(n, d, base)
    assert cos.shape == sin.shape == (n, d // 2) and cos.dtype == np.float64
    for t in (0, 1, n // 2, n - 1):
        for i in range(d // 2):
            theta = t / base ** (2 * i / d)  # written out per element, in Python's own float64
            assert cos[t, i] == pytest.approx(math.cos(theta), rel=0, abs=4e-16 * max(1.0, theta))
            assert sin[t, i] == pytest.approx(math.sin(theta), rel=0, abs=4e-16 * max(1.0, theta))


def test_first_pair_turns_one_radian_per_position_and_position_zero_is_identity():
    cos, sin = rope_angles(5, 8, 10000.0)
    np.testing.assert_array_equal(cos[0], 1.0)
    np.testing.assert_array_equal(sin[0], 0.0)
    np.testing.assert_allclose(np.arctan2(sin[:, 0], cos[:, 0]), np.arange(5) - 2 * np.pi * (np.arange(5) > 3.14),
                               atol=1e-15)
    # the last pair's frequency is base^(-(d-2)/d), the slowest
    assert math.isclose(np.arctan2(sin[1, -1], cos[1, -1]), 10000.0 ** (-6 / 8), rel_tol=1e-15)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_angles(4, 5, 10000.0)
