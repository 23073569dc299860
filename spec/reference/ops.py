"""The operators of SPEC.md in float64 numpy, each a forward and its hand-written backward.

`<op>_forward(...) -> (out, cache)` and `<op>_backward(d_out, cache) -> (d_inputs..., d_params...)`.
"""
from __future__ import annotations

import math

import numpy as np

from ..checks import IGNORE_INDEX

F64 = np.float64


# -- operators ------------------------------------------------------------------
def layer_norm_forward(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)  # biased variance
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def layer_norm_backward(dy, cache):
    xhat, rstd, g = cache
    C = xhat.shape[-1]
    dg = (dy * xhat).reshape(-1, C).sum(0)
    db = dy.reshape(-1, C).sum(0)
    dxhat = dy * g
    dx = rstd * (
        dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True)
    )
    return dx, dg, db


def rms_norm_forward(x, g, eps):
    rrms = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * rrms
    return xhat * g, (xhat, rrms, g)


def rms_norm_backward(dy, cache):
    xhat, rrms, g = cache
    C = xhat.shape[-1]
    dg = (dy * xhat).reshape(-1, C).sum(0)
    dxhat = dy * g
    return rrms * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True)), dg


def norm_forward(spec, p, prefix, x):
    """SPEC.md 3 and 14: the spec's norm at `prefix` (ln_1, ln_2, ln_f)."""
    if spec.norm == "rmsnorm":
        return rms_norm_forward(x, p[prefix + ".weight"], spec.norm_eps)
    if spec.norm == "layernorm_noaffine":
        return layer_norm_forward(x, 1.0, 0.0, spec.norm_eps)
    return layer_norm_forward(x, p[prefix + ".weight"], p.get(prefix + ".bias", 0.0), spec.norm_eps)


def norm_backward(spec, prefix, dy, cache, grads):
    """d input of the norm at `prefix`; its parameters' gradients go into `grads`."""
    if spec.norm == "rmsnorm":
        dx, grads[prefix + ".weight"] = rms_norm_backward(dy, cache)
        return dx
    dx, dg, db = layer_norm_backward(dy, cache)
    if spec.norm == "layernorm":
        grads[prefix + ".weight"] = dg
        if spec.bias == "on":
            grads[prefix + ".bias"] = db
    return dx


def linear_forward(x, w, b=None):
    y = x @ w.T
    return (y if b is None else y + b), (x, w, b is not None)


def linear_backward(dy, cache):
    """-> dx, dw, db (None without a bias)."""
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = dy2.T @ x.reshape(-1, x.shape[-1])
    return dy @ w, dw, (dy2.sum(0) if has_bias else None)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh_forward(x):
    u = _GELU_C * (x + 0.044715 * x**3)
    t = np.tanh(u)
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_tanh_backward(dy, cache):
    x, t = cache
    du_dx = _GELU_C * (1.0 + 3 * 0.044715 * x**2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)


def causal_attention_forward(q, k, v, scale, sink=None):
    """q, k, v: (B, H, T, D). softmax over keys j <= i of scale * q.k, with an optional sink.

    sink: None, or a logit per head (H,) that joins every row's softmax with a zero value:
    w_j = e^{s_j} / (e^{sink} + sum_k e^{s_k}). softmax1 is sink = 0, softmax_c is sink = ln c.
    """
    T = q.shape[-2]
    s = (q @ k.swapaxes(-1, -2)) * scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    s = np.where(future, -np.inf, s)
    m = s.max(-1, keepdims=True)
    if sink is not None:
        z = np.asarray(sink, F64).reshape(1, -1, 1, 1)
        m = np.maximum(m, z)  # stable for any sign: e^{z - m} never overflows
    e = np.exp(s - m)
    denom = e.sum(-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(z - m)
    p = e / denom
    return p @ v, (q, k, v, p, scale, sink is not None)


def causal_attention_backward(dy, cache):
    """-> dq, dk, dv, d_sink (per head, or None)."""
    q, k, v, p, scale, has_sink = cache
    dp = dy @ v.swapaxes(-1, -2)
    dv = p.swapaxes(-1, -2) @ dy
    row = (dp * p).sum(-1, keepdims=True)
    ds = p * (dp - row)  # masked entries have p = 0; the sink's value is 0, so its dp is 0
    dq = (ds @ k) * scale
    dk = (ds.swapaxes(-1, -2) @ q) * scale
    d_sink = None
    if has_sink:
        p_sink = 1.0 - p.sum(-1, keepdims=True)
        d_sink = (-p_sink * row).sum(axis=(0, 2, 3))
    return dq, dk, dv, d_sink


def unit_norm_forward(x):
    """Norm(x) = x / ||x||_2 over the last axis (no epsilon, as nGPT defines it)."""
    n = np.sqrt((x * x).sum(-1, keepdims=True))
    y = x / n
    return y, (y, n)


def unit_norm_backward(dy, cache):
    y, n = cache
    return (dy - y * (dy * y).sum(-1, keepdims=True)) / n


def silu_forward(x):
    sig = 1.0 / (1.0 + np.exp(-x))
    return x * sig, (x, sig)


def silu_backward(dy, cache):
    x, sig = cache
    return dy * sig * (1.0 + x * (1.0 - sig))


def rope_angles(T, D, base):
    """(cos, sin) of shape (T, D/2): position t rotates pair i by t * base^(-2i/D)."""
    inv_freq = base ** (-np.arange(0, D, 2, dtype=F64) / D)
    theta = np.arange(T, dtype=F64)[:, None] * inv_freq[None, :]
    return np.cos(theta), np.sin(theta)


def rope_forward(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the last axis by the position's angles."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out, (cos, sin)


def rope_backward(dy, cache):
    cos, sin = cache  # the transpose of a rotation is the rotation back
    da, db = dy[..., 0::2], dy[..., 1::2]
    dx = np.empty_like(dy)
    dx[..., 0::2] = da * cos + db * sin
    dx[..., 1::2] = -da * sin + db * cos
    return dx


def cross_entropy_forward(logits, targets):
    """Mean over the targets that are not IGNORE_INDEX of -log softmax(logits)[target]."""
    counted = targets != IGNORE_INDEX
    n = counted.sum()
    safe_t = np.where(counted, targets, 0)
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    sum_e = e.sum(-1, keepdims=True)
    logp_t = np.take_along_axis(z, safe_t[..., None], -1)[..., 0] - np.log(sum_e[..., 0])
    loss = -(logp_t * counted).sum() / n
    return loss, (e / sum_e, safe_t, counted, n)


def cross_entropy_backward(cache):
    probs, safe_t, counted, n = cache
    d = probs.copy()
    np.put_along_axis(d, safe_t[..., None], np.take_along_axis(d, safe_t[..., None], -1) - 1.0, -1)
    return d * (counted / n)[..., None]


