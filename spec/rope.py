"""RoPE's angle tables (SPEC.md 11.2), the one piece of positional math the backends share.

It lives here, not in spec/reference/: what the backends share must not be the oracle's own
code, or a wrong frequency would be computed identically by the reference and every backend and
be invisible to conformance. The reference computes its angles independently (reference/ops.py),
and tests/test_rope.py holds this table to the closed form.
"""
from __future__ import annotations

import numpy as np


def rope_angles(n_positions: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (n_positions, head_dim / 2) float64: position t rotates the pair
    (x[2i], x[2i+1]) by theta = t * base^(-2i / head_dim).

    In float64, once: float32 angles t * f drift by ~1e-4 rad at t = 1024; the backends round the
    tables to their compute dtype on use."""
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs: head_dim must be even, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim  # 2i / d, rounded once
    theta = np.outer(np.arange(n_positions, dtype=np.float64), np.power(float(base), -exponent))
    return np.cos(theta), np.sin(theta)
