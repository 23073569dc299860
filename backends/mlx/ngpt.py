"""nGPT, the normalized Transformer (SPEC.md section 11), as an mlx.nn.Module.

Names follow the canonical table (and NVIDIA's code): every matrix is kept unit-norm along its
embedding axis by `normalize_()`, which a training loop calls after each optimizer step.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ...spec import ModelSpec, param_table
from ...spec.params import ngpt_scales
from ...spec.rope import rope_angles
from .attention import KVCache, cache_offset
from .losses import cross_entropy
from .model import Linear, check_draws, check_targets, check_tokens, embed, init_from_spec


def justnorm(x: mx.array) -> mx.array:
    """x / ||x|| over the last axis, no epsilon (SPEC.md 11). In float32 inside and rounded once:
    in a half dtype every square, partial sum and quotient would round."""
    x32 = x.astype(mx.float32)
    return (x32 / mx.sqrt((x32 * x32).sum(axis=-1, keepdims=True))).astype(x.dtype)


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position's angles.

    Not mx.fast.rope(traditional=True): it pairs the same way but computes its angles in float32,
    1.2e-4 off at position 1024 where these float64 tables are 4e-7 off (SPEC.md 11.2)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.sqk_scale = ngpt_scales(spec)["ngpt_sqk"].multiplier
        # q and k are unit vectors times s_qk, so their dot product is a cosine: sqrt(d_k) restores
        # the logits' range where GPT-2 divides by it
        self.scale = math.sqrt(spec.head_dim)
        self.c_attn = Linear(spec.n_embd, 3 * spec.n_embd, bias=False)
        self.sqk = mx.zeros((spec.n_embd,))
        self.c_proj = Linear(spec.n_embd, spec.n_embd, bias=False)

    def __call__(self, x: mx.array, cos_sin, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        sqk = (self.sqk * self.sqk_scale).reshape(self.n_head, 1, -1)
        q, k = sqk * justnorm(q), sqk * justnorm(k)
        if cache is not None:  # keys as attention uses them: rotated at their own positions, normalized
            k, v = cache.update_and_fetch(k, v)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        uv = (8 if self.swiglu else 4) * spec.n_embd
        self.suv_scale = ngpt_scales(spec)["ngpt_suv"].multiplier
        self.c_fc = Linear(spec.n_embd, uv, bias=False)
        self.suv = mx.zeros((uv,))
        self.c_proj = Linear(4 * spec.n_embd, spec.n_embd, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        uv = self.c_fc(x) * (self.suv * self.suv_scale)
        # the nonlinearity in float32, rounded once, as model.MLP does for GELU (and torch inside)
        uv32 = uv.astype(mx.float32)
        if self.swiglu:
            u, g = mx.split(uv32, 2, axis=-1)
            m = u * nn.silu(g)
        else:
            m = nn.gelu_approx(uv32)
        return self.c_proj(m.astype(uv.dtype))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.alpha_scale = ngpt_scales(spec)["ngpt_alpha"].multiplier
        self.abs_alpha = spec.ngpt_alpha == "abs"
        self.attn = Attention(spec)
        self.attn_alpha = mx.zeros((spec.n_embd,))
        self.mlp = MLP(spec)
        self.mlp_alpha = mx.zeros((spec.n_embd,))

    def _update(self, h: mx.array, h_new: mx.array, alpha: mx.array) -> mx.array:
        alpha = alpha * self.alpha_scale
        alpha = mx.abs(alpha) if self.abs_alpha else alpha
        a = justnorm(h)  # h is unit-norm already, but the spec keeps the norm: it shapes the gradient
        return justnorm(a + alpha * (justnorm(h_new) - a))

    def __call__(self, h: mx.array, cos_sin, cache: KVCache | None = None) -> mx.array:
        h = self._update(h, self.attn(h, cos_sin, cache), self.attn_alpha)
        return self._update(h, self.mlp(h), self.mlp_alpha)


class NGPT(nn.Module):
    def __init__(self, spec: ModelSpec, device: mx.Device | None = None):
        super().__init__()
        self.spec = spec
        self.device = device or mx.default_device()  # where every call computes
        self.sz_scale = ngpt_scales(spec)["ngpt_sz"].multiplier
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.h = [Block(spec) for _ in range(spec.n_layer)]
        self.lm_head = Linear(spec.n_embd, spec.vocab_size, bias=False)
        self.sz = mx.zeros((spec.vocab_size,))
        # RoPE angles in float64 once, kept in float32 and rounded to the model's dtype on use; the
        # leading underscore keeps them out of parameters()
        self._rope = None
        if spec.positions == "rope":
            angles = rope_angles(spec.n_positions, spec.head_dim, spec.rope_base)
            self._rope = tuple(mx.array(t.astype(np.float32)) for t in angles)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_from_spec(self)
        self.normalize_()

    def normalize_(self) -> None:
        """SPEC.md 11.3: each matrix unit-norm along its embedding axis, computed in float32.

        MLX optimizers hold no references to the arrays (their state is a tree keyed like the
        parameters), so replacing them through update(), as Optimizer.update does, is "in place"."""
        params = dict(tree_flatten(self.parameters()))
        fresh = []
        with mx.stream(self.device):
            for info in param_table(self.spec):
                if info.unit_norm_axis is not None:
                    w = params[info.name]
                    w32 = w.astype(mx.float32)
                    norm = mx.sqrt((w32 * w32).sum(axis=info.unit_norm_axis, keepdims=True))
                    fresh.append((info.name, (w32 / norm).astype(w.dtype)))
        self.update(tree_unflatten(fresh))

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, T, vocab_size) for (B, T) token ids; `cache` and `last_only` as GPT has them."""
        check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        with mx.stream(self.device):
            h = embed(self.spec, self.wte, tokens)  # no position table: positions enter through RoPE, or not at all
            # RoPE at the absolute positions n .. n+T-1, not the index within this call
            cos_sin = None if self._rope is None else tuple(t[n : n + tokens.shape[1]].astype(h.dtype) for t in self._rope)
            for i, block in enumerate(self.h):
                h = block(h, cos_sin, cache[i] if cache else None)
            if last_only:
                h = h[:, -1:]
            return self.lm_head(h) * (self.sz * self.sz_scale)

    def loss(self, tokens: mx.array, targets: mx.array, draws=None) -> mx.array:
        """The spec's loss of the logits for `tokens` against `targets` (float32, a scalar); nGPT's loss is
        "final", so `draws` must be None (they are loss="early_exit"'s, as GPT.loss has them)."""
        return self.loss_and_logits(tokens, targets, draws)[0]

    def loss_and_logits(self, tokens: mx.array, targets: mx.array,
                        draws: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """loss() and the logits, from one forward."""
        check_targets(tokens, targets)
        check_draws(self.spec, tokens, draws)
        with mx.stream(self.device):
            logits = self(tokens)
            return cross_entropy(logits, targets), logits
