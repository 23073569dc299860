"""nGPT, the normalized Transformer (SPEC.md section 11), in float64: forward, backward, normalization."""
from __future__ import annotations

import math

import numpy as np

from ..params import ngpt_scales, param_table
from .gpt2 import merge_heads, split_heads
from .ops import (
    causal_attention_backward, causal_attention_forward, gelu_tanh_backward, gelu_tanh_forward,
    linear_backward, linear_forward, rope_angles, rope_backward, rope_forward, silu_backward,
    silu_forward, unit_norm_backward, unit_norm_forward,
)


def _alpha_forward(spec, stored):
    """alpha_eff = |p| * m (NVIDIA) or p * m (seed); returns it and d alpha_eff / d p."""
    m = ngpt_scales(spec)["ngpt_alpha"].multiplier
    if spec.ngpt_alpha == "abs":
        return np.abs(stored) * m, np.sign(stored) * m
    return stored * m, np.full_like(stored, m)


def _normalized_update_forward(spec, h, h_new, alpha_stored):
    """h <- Norm( Norm(h) + alpha * (Norm(h_new) - Norm(h)) )."""
    a, c_a = unit_norm_forward(h)
    b, c_b = unit_norm_forward(h_new)
    alpha, d_alpha_dp = _alpha_forward(spec, alpha_stored)
    out, c_out = unit_norm_forward(a + alpha * (b - a))
    return out, (a, b, alpha, d_alpha_dp, c_a, c_b, c_out)


def _normalized_update_backward(d_out, cache):
    """-> d h, d h_new, d alpha_stored."""
    a, b, alpha, d_alpha_dp, c_a, c_b, c_out = cache
    d_res = unit_norm_backward(d_out, c_out)
    d_alpha = (d_res * (b - a)).reshape(-1, a.shape[-1]).sum(0)
    d_h = unit_norm_backward(d_res * (1.0 - alpha), c_a)
    d_new = unit_norm_backward(d_res * alpha, c_b)
    return d_h, d_new, d_alpha * d_alpha_dp


def _layer_forward(spec, p, i, h, rope):
    n = f"h.{i}."
    H, D = spec.n_head, spec.head_dim
    scales = ngpt_scales(spec)
    c = {}
    qkv, c["c_attn"] = linear_forward(h, p[n + "attn.c_attn.weight"])
    q, k, v = (split_heads(t, H) for t in np.split(qkv, 3, axis=-1))
    if rope is not None:
        q, c["rope_q"] = rope_forward(q, *rope)
        k, c["rope_k"] = rope_forward(k, *rope)
    qn, c["norm_q"] = unit_norm_forward(q)
    kn, c["norm_k"] = unit_norm_forward(k)
    sqk = (p[n + "attn.sqk"] * scales["ngpt_sqk"].multiplier).reshape(1, H, 1, D)
    y, c["attn"] = causal_attention_forward(sqk * qn, sqk * kn, v, math.sqrt(D))  # scale sqrt(d_h)
    c["qn"], c["kn"], c["sqk"] = qn, kn, sqk
    h_att, c["c_proj"] = linear_forward(merge_heads(y), p[n + "attn.c_proj.weight"])
    h, c["update_a"] = _normalized_update_forward(spec, h, h_att, p[n + "attn_alpha"])

    uv, c["c_fc"] = linear_forward(h, p[n + "mlp.c_fc.weight"])
    suv = p[n + "mlp.suv"] * scales["ngpt_suv"].multiplier
    c["uv"], c["suv"] = uv, suv
    uv = suv * uv
    if spec.mlp == "swiglu":
        u, g = np.split(uv, 2, axis=-1)
        s, c["silu"] = silu_forward(g)
        c["u"], c["s"] = u, s
        m = u * s
    else:
        m, c["gelu"] = gelu_tanh_forward(uv)
    h_mlp, c["mlp_c_proj"] = linear_forward(m, p[n + "mlp.c_proj.weight"])
    h, c["update_m"] = _normalized_update_forward(spec, h, h_mlp, p[n + "mlp_alpha"])
    return h, c


def _layer_backward(spec, i, dh, c, grads):
    n = f"h.{i}."
    scales = ngpt_scales(spec)
    dh, d_mlp, grads[n + "mlp_alpha"] = _normalized_update_backward(dh, c["update_m"])
    dm, grads[n + "mlp.c_proj.weight"], _ = linear_backward(d_mlp, c["mlp_c_proj"])
    if spec.mlp == "swiglu":
        du, dg = dm * c["s"], silu_backward(dm * c["u"], c["silu"])
        d_uv_scaled = np.concatenate([du, dg], axis=-1)
    else:
        d_uv_scaled = gelu_tanh_backward(dm, c["gelu"])
    grads[n + "mlp.suv"] = (d_uv_scaled * c["uv"]).reshape(-1, c["uv"].shape[-1]).sum(0) * scales["ngpt_suv"].multiplier
    d_h_mlp_in, grads[n + "mlp.c_fc.weight"], _ = linear_backward(d_uv_scaled * c["suv"], c["c_fc"])
    dh = dh + d_h_mlp_in

    dh, d_att, grads[n + "attn_alpha"] = _normalized_update_backward(dh, c["update_a"])
    dy, grads[n + "attn.c_proj.weight"], _ = linear_backward(d_att, c["c_proj"])
    dq2, dk2, dv, _ = causal_attention_backward(split_heads(dy, spec.n_head), c["attn"])
    d_sqk = (dq2 * c["qn"] + dk2 * c["kn"]).sum(axis=(0, 2))  # (H, D)
    grads[n + "attn.sqk"] = d_sqk.reshape(-1) * scales["ngpt_sqk"].multiplier
    dq = unit_norm_backward(dq2 * c["sqk"], c["norm_q"])
    dk = unit_norm_backward(dk2 * c["sqk"], c["norm_k"])
    if "rope_q" in c:
        dq, dk = rope_backward(dq, c["rope_q"]), rope_backward(dk, c["rope_k"])
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
    d_in, grads[n + "attn.c_attn.weight"], _ = linear_backward(dqkv, c["c_attn"])
    return dh + d_in


def forward(spec, p, tokens):
    T = tokens.shape[1]
    rope = rope_angles(T, spec.head_dim, spec.rope_base) if spec.positions == "rope" else None
    h = p["wte.weight"][tokens]  # no position table: positions enter through RoPE, or not at all
    caches = []
    for i in range(spec.n_layer):
        h, c = _layer_forward(spec, p, i, h, rope)
        caches.append(c)
    raw = h @ p["lm_head.weight"].T
    sz = p["sz"] * ngpt_scales(spec)["ngpt_sz"].multiplier
    return raw * sz, (tokens, caches, h, raw, sz)


def backward(spec, p, cache, dlogits):
    tokens, caches, h, raw, sz = cache
    V, C = p["lm_head.weight"].shape
    grads = {"sz": (dlogits * raw).reshape(-1, V).sum(0) * ngpt_scales(spec)["ngpt_sz"].multiplier}
    d_raw = dlogits * sz
    grads["lm_head.weight"] = d_raw.reshape(-1, V).T @ h.reshape(-1, C)
    dh = d_raw @ p["lm_head.weight"]
    for i in reversed(range(spec.n_layer)):
        dh = _layer_backward(spec, i, dh, caches[i], grads)
    d_wte = np.zeros_like(p["wte.weight"])
    np.add.at(d_wte, tokens.reshape(-1), dh.reshape(-1, C))
    grads["wte.weight"] = d_wte
    return grads


def normalize_weights(spec, params):
    """SPEC.md 11.3: each unit-norm matrix divided by its L2 norms along its embedding axis."""
    out = dict(params)
    for info in param_table(spec):
        if info.unit_norm_axis is not None:
            w = np.asanyarray(params[info.name], np.float64)  # asany: conditioning.py's Noisy stays Noisy
            out[info.name] = w / np.sqrt((w * w).sum(axis=info.unit_norm_axis, keepdims=True))
    return out
