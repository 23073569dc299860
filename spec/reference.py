"""The executable spec: GPT-2 forward and hand-written backward in float64 numpy.

Each operator of SPEC.md is a pair `<op>_forward(...) -> (out, cache)` and
`<op>_backward(d_out, cache) -> (d_inputs..., d_params...)`; `loss_and_grads`
chains them. No autodiff: the backward passes are the derivatives written out,
and tests/test_reference.py checks them against central finite differences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .checks import IGNORE_INDEX, check_state_shapes, check_targets_array, check_tokens_array
from .config import ModelSpec
from .params import param_table

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


def linear_forward(x, w, b):
    return x @ w.T + b, (x, w)


def linear_backward(dy, cache):
    x, w = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = dy2.T @ x.reshape(-1, x.shape[-1])
    db = dy2.sum(0)
    return dy @ w, dw, db


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh_forward(x):
    u = _GELU_C * (x + 0.044715 * x**3)
    t = np.tanh(u)
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_tanh_backward(dy, cache):
    x, t = cache
    du_dx = _GELU_C * (1.0 + 3 * 0.044715 * x**2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)


def causal_attention_forward(q, k, v):
    """q, k, v: (B, H, T, D). Softmax over keys j <= i of q.k / sqrt(D)."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    s = (q @ k.swapaxes(-1, -2)) * scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    s = np.where(future, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v, (q, k, v, p, scale)


def causal_attention_backward(dy, cache):
    q, k, v, p, scale = cache
    dp = dy @ v.swapaxes(-1, -2)
    dv = p.swapaxes(-1, -2) @ dy
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))  # masked entries have p = 0
    dq = (ds @ k) * scale
    dk = (ds.swapaxes(-1, -2) @ q) * scale
    return dq, dk, dv


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


# -- the model --------------------------------------------------------------------
def _split_heads(x, n_head):
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def _block_forward(spec, p, i, x):
    h = f"h.{i}."
    caches = {}
    a, caches["ln_1"] = layer_norm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], spec.norm_eps)
    qkv, caches["c_attn"] = linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
    q, k, v = (_split_heads(t, spec.n_head) for t in np.split(qkv, 3, axis=-1))
    y, caches["attn"] = causal_attention_forward(q, k, v)
    y, caches["attn.c_proj"] = linear_forward(_merge_heads(y), p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
    x = x + y
    m, caches["ln_2"] = layer_norm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], spec.norm_eps)
    m, caches["c_fc"] = linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
    m, caches["gelu"] = gelu_tanh_forward(m)
    m, caches["mlp.c_proj"] = linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    return x + m, caches


def _block_backward(spec, i, dx, caches, grads):
    h = f"h.{i}."
    # x_out = x_mid + mlp(ln_2(x_mid)); x_mid = x_in + attn(ln_1(x_in))
    dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = linear_backward(dx, caches["mlp.c_proj"])
    dm = gelu_tanh_backward(dm, caches["gelu"])
    dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = linear_backward(dm, caches["c_fc"])
    dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layer_norm_backward(dm, caches["ln_2"])
    dx = dx + dm
    dy, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = linear_backward(dx, caches["attn.c_proj"])
    dq, dk, dv = causal_attention_backward(_split_heads(dy, spec.n_head), caches["attn"])
    dqkv = np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)
    da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = linear_backward(dqkv, caches["c_attn"])
    da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layer_norm_backward(da, caches["ln_1"])
    return dx + da


def _as_f64(spec, params):
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "reference parameters")
    return {n: np.asarray(a, dtype=F64) for n, a in params.items()}


def _forward(spec, p, tokens):
    tokens = np.asarray(tokens)
    check_tokens_array(spec, tokens)
    T = tokens.shape[1]
    x = p["wte.weight"][tokens] + p["wpe.weight"][:T]
    block_caches = []
    for i in range(spec.n_layer):
        x, c = _block_forward(spec, p, i, x)
        block_caches.append(c)
    xf, ln_f_cache = layer_norm_forward(x, p["ln_f.weight"], p["ln_f.bias"], spec.norm_eps)
    logits = xf @ p["wte.weight"].T  # LM head tied to the token embedding
    return logits, (tokens, block_caches, ln_f_cache, xf)


def forward(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens) -> np.ndarray:
    """Logits (B, T, vocab_size) in float64."""
    return _forward(spec, _as_f64(spec, params), tokens)[0]


@dataclass
class LossAndGrads:
    loss: float
    logits: np.ndarray
    grads: dict[str, np.ndarray]  # canonical names and layouts, float64


def loss_and_grads(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets) -> LossAndGrads:
    """Mean cross-entropy, the logits, and the gradient of the loss for every parameter."""
    p = _as_f64(spec, params)
    logits, (tokens, block_caches, ln_f_cache, xf) = _forward(spec, p, tokens)
    targets = np.asarray(targets)
    check_targets_array(spec, tokens.shape, targets)
    loss, ce_cache = cross_entropy_forward(logits, targets)

    grads: dict[str, np.ndarray] = {}
    dlogits = cross_entropy_backward(ce_cache)
    V, C = p["wte.weight"].shape
    d_wte = dlogits.reshape(-1, V).T @ xf.reshape(-1, C)
    dx = dlogits @ p["wte.weight"]
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layer_norm_backward(dx, ln_f_cache)
    for i in reversed(range(spec.n_layer)):
        dx = _block_backward(spec, i, dx, block_caches[i], grads)
    # embeddings: scatter-add over token ids and positions
    np.add.at(d_wte, tokens.reshape(-1), dx.reshape(-1, C))
    grads["wte.weight"] = d_wte
    d_wpe = np.zeros_like(p["wpe.weight"])
    d_wpe[: tokens.shape[1]] = dx.sum(0)
    grads["wpe.weight"] = d_wpe
    ordered = {info.name: grads[info.name] for info in param_table(spec)}
    return LossAndGrads(float(loss), logits, ordered)


def loss(spec: ModelSpec, params: Mapping[str, np.ndarray], tokens, targets) -> float:
    p = _as_f64(spec, params)
    logits = _forward(spec, p, tokens)[0]
    targets = np.asarray(targets)
    check_targets_array(spec, np.shape(tokens), targets)
    return float(cross_entropy_forward(logits, targets)[0])
