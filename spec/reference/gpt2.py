"""The GPT-2 architecture (SPEC.md sections 3 and 10) in float64: forward with caches, backward."""
from __future__ import annotations

import math

import numpy as np

from .ops import (
    causal_attention_backward, causal_attention_forward, gelu_tanh_backward, gelu_tanh_forward,
    linear_backward, linear_forward, norm_backward, norm_forward,
)


def split_heads(x, n_head):
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention_sink(spec, p, i):
    """The sink logit per head of SPEC.md 10.1, or None for the standard softmax."""
    if spec.attention == "softmax":
        return None
    if spec.attention == "learned_sinks":
        return p[f"h.{i}.attn.sinks"]
    c = 1.0 if spec.attention == "softmax1" else spec.softmax_c
    return np.full(spec.n_head, math.log(c))


def _block_forward(spec, p, i, x):
    h = f"h.{i}."
    caches = {}
    a, caches["ln_1"] = norm_forward(spec, p, h + "ln_1", x)
    qkv, caches["c_attn"] = linear_forward(a, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias"))
    q, k, v = (split_heads(t, spec.n_head) for t in np.split(qkv, 3, axis=-1))
    y, caches["attn"] = causal_attention_forward(q, k, v, 1.0 / math.sqrt(spec.head_dim), attention_sink(spec, p, i))
    y, caches["attn.c_proj"] = linear_forward(merge_heads(y), p[h + "attn.c_proj.weight"], p.get(h + "attn.c_proj.bias"))
    x = x + y
    m, caches["ln_2"] = norm_forward(spec, p, h + "ln_2", x)
    m, caches["c_fc"] = linear_forward(m, p[h + "mlp.c_fc.weight"], p.get(h + "mlp.c_fc.bias"))
    m, caches["gelu"] = gelu_tanh_forward(m)
    m, caches["mlp.c_proj"] = linear_forward(m, p[h + "mlp.c_proj.weight"], p.get(h + "mlp.c_proj.bias"))
    return x + m, caches


def _block_backward(spec, i, dx, caches, grads):
    h = f"h.{i}."
    # x_out = x_mid + mlp(ln_2(x_mid)); x_mid = x_in + attn(ln_1(x_in))
    dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = linear_backward(dx, caches["mlp.c_proj"])
    dm = gelu_tanh_backward(dm, caches["gelu"])
    dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = linear_backward(dm, caches["c_fc"])
    dm = norm_backward(spec, h + "ln_2", dm, caches["ln_2"], grads)
    dx = dx + dm
    dy, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = linear_backward(dx, caches["attn.c_proj"])
    dq, dk, dv, d_sink = causal_attention_backward(split_heads(dy, spec.n_head), caches["attn"])
    if spec.attention == "learned_sinks":
        grads[h + "attn.sinks"] = d_sink
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
    da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = linear_backward(dqkv, caches["c_attn"])
    da = norm_backward(spec, h + "ln_1", da, caches["ln_1"], grads)
    return dx + da


def forward(spec, p, tokens):
    """-> logits (B, T, V), cache for backward."""
    T = tokens.shape[1]
    x = p["wte.weight"][tokens] + p["wpe.weight"][:T]
    block_caches = []
    for i in range(spec.n_layer):
        x, c = _block_forward(spec, p, i, x)
        block_caches.append(c)
    xf, ln_f_cache = norm_forward(spec, p, "ln_f", x)
    logits = xf @ p["wte.weight"].T  # LM head tied to the token embedding
    return logits, (tokens, block_caches, ln_f_cache, xf)


def backward(spec, p, cache, dlogits):
    """Gradients of every parameter, given d loss / d logits."""
    tokens, block_caches, ln_f_cache, xf = cache
    grads = {}
    V, C = p["wte.weight"].shape
    d_wte = dlogits.reshape(-1, V).T @ xf.reshape(-1, C)
    dx = dlogits @ p["wte.weight"]
    dx = norm_backward(spec, "ln_f", dx, ln_f_cache, grads)
    for i in reversed(range(spec.n_layer)):
        dx = _block_backward(spec, i, dx, block_caches[i], grads)
    np.add.at(d_wte, tokens.reshape(-1), dx.reshape(-1, C))  # embedding: scatter-add over ids
    grads["wte.weight"] = d_wte
    d_wpe = np.zeros_like(p["wpe.weight"])
    d_wpe[: tokens.shape[1]] = dx.sum(0)
    grads["wpe.weight"] = d_wpe
    return {n: g for n, g in grads.items() if g is not None}  # bias="off": linear_backward's None
