"""Matrix products in half precision (SPEC.md 7): inner products accumulate in float32 and the result rounds once
to the dtype, in the forward and in both gradients. torch's float16 and MLX's half-precision products on the CPU
run as float32 GEMMs (backends/<name>/model.py `linear`, 7-20x faster there); this holds them, and the products
torch and MLX compute themselves, to that arithmetic against float64. The tinygrad backend keeps tinygrad's own
products, which the conformance suite checks end to end."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from gptspec.weights import round_to_dtype

HALF = ("bfloat16", "float16")
MANTISSA_BITS = {"bfloat16": 8, "float16": 11}  # with the implicit bit: ulp(v) = 2^(floor(log2 |v|) + 1 - bits)


def linear_and_grads(backend: str, x, w, b, dy, dtype: str):
    """The backend's `linear(x, w, b)` in `dtype` on the CPU, and the gradients of <dy, y> for x, w and b."""
    model = importlib.import_module(f"gptspec.backends.{backend}.model")
    if backend == "torch":
        import torch

        tx, tw, tb = (torch.tensor(a, dtype=getattr(torch, dtype), requires_grad=True) for a in (x, w, b))
        y = model.linear(tx, tw, tb)
        y.backward(torch.tensor(dy, dtype=y.dtype))
        return [t.detach().float().numpy() for t in (y, tx.grad, tw.grad, tb.grad)]
    import mlx.core as mx

    with mx.stream(mx.cpu):
        args = [mx.array(a).astype(getattr(mx, dtype)) for a in (x, w, b)]
        (y,), grads = mx.vjp(lambda *a: [model.linear(*a)], args, [mx.array(dy).astype(args[0].dtype)])
        return [np.array(t.astype(mx.float32)) for t in (y, *grads)]


def assert_rounded_once(got: np.ndarray, exact: np.ndarray, terms: np.ndarray, dtype: str, what: str) -> None:
    """`got` is `exact` (float64) rounded once to `dtype`, up to a float32 accumulation's error: within half an
    ulp of the dtype plus 2^-20 of the sum of the terms' magnitudes (`terms`). A sum accumulated in the dtype, or
    a result rounded twice, is off by up to a whole ulp and more."""
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) + 1 - MANTISSA_BITS[dtype])
    excess = np.abs(got - exact) - (0.5 * ulp + 2.0 ** -20 * terms)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (f"{what} in {dtype}: {got[worst]!r} at {worst} where float64 gives {exact[worst]!r}, "
                               f"{abs(got[worst] - exact[worst]) / ulp[worst]:.2f} ulp away")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_half_precision_product_and_its_gradients_round_once(framework, dtype):
    pytest.importorskip(framework)
    rng = np.random.default_rng(7)
    T, K, N = 48, 768, 256  # GPT-2's width: a sum of 768 terms in the dtype would lose ~sqrt(768)/2 ulp
    x, w, b, dy = (round_to_dtype(rng.standard_normal(s).astype(np.float32), dtype).astype(np.float64)
                   for s in ((T, K), (N, K), (N,), (T, N)))
    y, dx, dw, db = linear_and_grads(framework, x, w, b, dy, dtype)
    assert_rounded_once(y, x @ w.T + b, np.abs(x) @ np.abs(w).T + np.abs(b), dtype, "y = x w^T + b")
    assert_rounded_once(dx, dy @ w, np.abs(dy) @ np.abs(w), dtype, "dx = dy w")
    assert_rounded_once(dw, dy.T @ x, np.abs(dy).T @ np.abs(x), dtype, "dw = dy^T x")
    assert_rounded_once(db, dy.sum(0), np.abs(dy).sum(0), dtype, "db = sum dy")
