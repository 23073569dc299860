"""Attention and the KV cache of the torch backend (SPEC.md 3, 10, 12), shared by GPT-2 and nGPT.

`attention` is torch's fused scaled_dot_product_attention with the spec's causal mask, aligned for
queries that follow cached positions, and SPEC.md 10's sink entering through the additive mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...spec import ModelSpec
from ...spec.checks import check_cache_room


class KVCache:
    """One layer's keys and values (B, H, n, D) for generation (SPEC.md 12), as mlx-lm keeps them:
    preallocated in steps of 256 positions and written in place, so a decoding step copies only
    its own keys. `model.make_cache()` gives one per layer; `model(tokens, cache=...)` fills them."""
    step = 256

    def __init__(self):
        self.k = self.v = None
        self.offset = 0  # positions held

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, t, D) keys and values; return all of them so far."""
        n, t = self.offset, k.shape[2]
        if self.k is None or n + t > self.k.shape[2]:
            size = -(-(n + t) // self.step) * self.step
            # values need not be shaped as keys: attention_values="identity" caches (B, 1, n, C)
            grown = [k.new_zeros(*k.shape[:2], size, k.shape[3]), v.new_zeros(*v.shape[:2], size, v.shape[3])]
            if self.k is not None:
                grown[0][:, :, :n], grown[1][:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
            self.k, self.v = grown
        self.k[:, :, n : n + t], self.v[:, :, n : n + t] = k, v
        self.offset = n + t
        return self.k[:, :, : n + t], self.v[:, :, : n + t]


def cache_offset(spec: ModelSpec, tokens: torch.Tensor, cache) -> int:
    """The position of the first of `tokens` after `cache` (a list of KVCache, or None); the
    context must hold them all."""
    n = cache[0].offset if cache else 0
    check_cache_room(spec.n_positions, n, tokens.shape[1])
    return n


def attention(q, k, v, scale=None, sink=None):
    """Causal attention of T queries, the last T of the L positions of k and v (L > T with a cache):
    query i sees keys 0 .. L-T+i. SDPA's is_causal aligns its mask top-left, right only when L == T,
    so a cache needs the mask explicitly; a lone new query sees every key and needs none.

    `sink` (H,): SPEC.md 10's sink as an extra key k* = 0 with value v* = 0 that every query sees.
    Its logit enters through the additive mask, so it is not multiplied by the attention scale, and
    the fused kernel still computes the softmax (in float32)."""
    B, H, T, D = q.shape
    L = k.shape[2]
    if sink is None:
        if T == L or T == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale)
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    causal = torch.full((T, L), float("-inf"), device=q.device, dtype=q.dtype).triu(L - T + 1)
    mask = torch.cat([sink.to(q.dtype).view(H, 1, 1).expand(H, T, 1), causal.expand(H, T, L)], dim=-1)
    # the sink's key and value are zeros of their own widths: identity values are C wide, not D (SPEC.md 17)
    k0, v0 = k.new_zeros(*k.shape[:2], 1, k.shape[3]), v.new_zeros(*v.shape[:2], 1, v.shape[3])
    return F.scaled_dot_product_attention(q, torch.cat([k0, k], 2), torch.cat([v0, v], 2), attn_mask=mask,
                                          scale=scale)
