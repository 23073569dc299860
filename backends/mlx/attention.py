"""Attention and the KV cache of the MLX backend (SPEC.md 3, 10, 12, 17), shared by GPT-2 and nGPT.

The fused mx.fast.scaled_dot_product_attention does the work where it can; the learned sinks'
gradient and the value-free attention of SPEC.md 17 need plain ops, here.
"""
from __future__ import annotations

import mlx.core as mx

from ...spec import ModelSpec
from ...spec.checks import check_cache_room


class KVCache:
    """One layer's keys and values (B, H, n, D) for generation (SPEC.md 12), as mlx-lm's KVCache:
    preallocated in steps of 256 positions and written by slice assignment. `model.make_cache()`
    gives one per layer; `model(tokens, cache=...)` fills them."""
    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # positions held

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H, t, D) keys and values; return all of them so far. Values may have their own
        head count and width (attention_values="identity" keeps the input itself, (B, 1, t, C))."""
        n, t = self.offset, k.shape[2]
        if self.keys is None or n + t > self.keys.shape[2]:
            size = -(-(n + t) // self.step) * self.step
            grown = [mx.zeros((a.shape[0], a.shape[1], size, a.shape[3]), a.dtype) for a in (k, v)]
            if self.keys is not None:
                grown[0][:, :, :n], grown[1][:, :, :n] = self.keys[:, :, :n], self.values[:, :, :n]
            self.keys, self.values = grown
        self.keys[:, :, n : n + t], self.values[:, :, n : n + t] = k, v
        self.offset = n + t
        return self.keys[:, :, : n + t], self.values[:, :, : n + t]


def cache_offset(spec: ModelSpec, tokens: mx.array, cache) -> int:
    """The position of the first of `tokens` after `cache` (a list of KVCache, or None); the
    context must hold them all."""
    n = cache[0].offset if cache else 0
    check_cache_room(spec.n_positions, n, tokens.shape[1])
    return n


def learned_sink_attention(scale: float):
    """Causal attention with a learned sink logit per head: fused forward, plain-op backward.

    Where MLX 0.32 has a fused SDPA backward (GPU), asking it for the sinks' gradient raises "Does not
    support VJP with respect to mask or attention sinks", so the gradient differentiates the same math
    in plain ops: MLX's own CPU fallback (scores in q's dtype, softmax in float32, sink column dropped).
    """
    def plain(q, k, v, sinks):
        T, L = q.shape[-2], k.shape[-2]
        scores = (q * scale) @ k.swapaxes(-1, -2)
        scores = mx.where(mx.tri(T, L, L - T, dtype=mx.bool_), scores, -mx.inf)
        sink = mx.broadcast_to(sinks[:, None, None], (*scores.shape[:-1], 1))
        w = mx.softmax(mx.concatenate([sink, scores], axis=-1), axis=-1, precise=True)
        return w[..., 1:] @ v

    @mx.custom_function
    def attend(q, k, v, sinks):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal", sinks=sinks)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        return mx.vjp(plain, list(primals), [cotangent])[1]

    return attend


def identity_value_attention(q: mx.array, k: mx.array, x: mx.array, scale: float, sinks: mx.array | None,
                             head_reduce: str) -> mx.array:
    """SPEC.md 17: every head's causal softmax applied to the input x (B, L, C) itself, the heads summed or
    averaged: (B, T, C) for q (B, H, T, D), k (B, H, L, D), the last T of the L positions being the queries'.

    Plain ops, not mx.fast.scaled_dot_product_attention: the values are C wide, not D. Since every head
    reads the same x, the heads' weights are reduced first, sum_h A_h x = (sum_h A_h) x: one (T, L) @ (L, C)
    product instead of H. Scores, softmax and product in float32, whatever the dtype.
    """
    T, L = q.shape[-2], k.shape[-2]
    scores = (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2)
    scores = mx.where(mx.tri(T, L, L - T, dtype=mx.bool_), scores, -mx.inf)  # query i sees keys 0 .. L-T+i
    if sinks is None:
        w = mx.softmax(scores, axis=-1, precise=True)
    else:  # SPEC.md 10: a sink logit per head, unscaled, with a zero value: a column dropped after the softmax
        sink = mx.broadcast_to(sinks.astype(mx.float32)[:, None, None], (*scores.shape[:-1], 1))
        w = mx.softmax(mx.concatenate([sink, scores], axis=-1), axis=-1, precise=True)[..., 1:]
    w = w.sum(axis=1) if head_reduce == "sum" else w.mean(axis=1)
    return (w @ x.astype(mx.float32)).astype(x.dtype)
