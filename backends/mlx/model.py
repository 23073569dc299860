"""GPT-2 as an mlx.nn.Module, built from a ModelSpec (SPEC.md sections 2-4, and 10's attention sinks).

The parameter tree flattens to the spec's canonical names (`h.0.attn.c_attn.weight`, ...),
Linear weights are (out, in) as nn.Linear keeps them, and the LM head is the token embedding
itself (`wte.as_linear`), so there is no `lm_head` to tie.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ...spec import IGNORE_INDEX, ModelSpec, param_table
from ...spec.checks import check_cache_room, check_targets, check_tokens
from ...spec.params import init_law


class KVCache:
    """One layer's keys and values (B, H, n, D) for generation (SPEC.md 12), as mlx-lm's KVCache:
    preallocated in steps of 256 positions and written by slice assignment. `model.make_cache()`
    gives one per layer; `model(tokens, cache=...)` fills them."""
    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # positions held

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H, t, D) keys and values; return all of them so far."""
        n, t = self.offset, k.shape[2]
        if self.keys is None or n + t > self.keys.shape[2]:
            B, H, _, D = k.shape
            size = -(-(n + t) // self.step) * self.step
            grown = [mx.zeros((B, H, size, D), k.dtype), mx.zeros((B, H, size, D), v.dtype)]
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


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.scale = spec.head_dim ** -0.5
        self.c_attn = nn.Linear(spec.n_embd, 3 * spec.n_embd, bias=spec.bias == "on")
        if spec.attention == "learned_sinks":
            self.sinks = mx.zeros((spec.n_head,))
            self._attend_learned = learned_sink_attention(self.scale)
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")
        # softmax1 / softmax_c: a constant sink logit ln c per head (SPEC.md 10), never trained
        self._sink = {"softmax1": 0.0, "softmax_c": math.log(spec.softmax_c)}.get(spec.attention)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # MLX aligns "causal" bottom-right: query i of T sees keys 0 .. L-T+i, the spec's mask both
        # without a cache (L == T) and with one (the new queries follow the L-T cached positions).
        # `sinks=` is SPEC.md 10's sink exactly: a logit per head, not scaled, with a zero value.
        # MLX requires it in q's dtype, so a constant ln c is rounded to it (as torch's mask is).
        if "sinks" in self:
            y = self._attend_learned(q, k, v, self.sinks)
        else:
            sinks = None if self._sink is None else mx.full((self.n_head,), self._sink, q.dtype)
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal", sinks=sinks)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))


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


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias == "on")
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias == "on")

    def __call__(self, x: mx.array) -> mx.array:
        h = self.c_fc(x)
        # The tanh form (nn.gelu is erf). MLX composes it of seven elementwise ops, each rounding in a
        # half dtype, which doubled float16 gradient errors (to the bound); torch computes GELU in
        # float32 internally. So do the same: float32 inside, the dtype outside.
        return self.c_proj(nn.gelu_approx(h.astype(mx.float32)).astype(h.dtype))


def make_norm(spec: ModelSpec) -> nn.Module:
    """SPEC.md 3 and 14: the spec's norm, its eps always explicit (the frameworks' defaults differ)."""
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.n_embd, eps=spec.norm_eps)
    return nn.LayerNorm(spec.n_embd, eps=spec.norm_eps, affine=spec.norm == "layernorm", bias=spec.bias == "on")


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln_1 = make_norm(spec)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = make_norm(spec)
        self.mlp = MLP(spec)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec, device: mx.Device | None = None):
        super().__init__()
        self.spec = spec
        self.device = device or mx.default_device()  # where every call computes
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        self.h = [Block(spec) for _ in range(spec.n_layer)]
        self.ln_f = make_norm(spec)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_from_spec(self)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, T, vocab_size) for (B, T) token ids. With `cache` (from make_cache()), the tokens
        sit at the positions after those in it, which they join; `last_only`: the last position's only."""
        _check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        with mx.stream(self.device):
            x = self.wte(tokens) + self.wpe(mx.arange(n, n + tokens.shape[1]))
            for i, block in enumerate(self.h):
                x = block(x, cache[i] if cache else None)
            if last_only:
                x = x[:, -1:]
            return self.wte.as_linear(self.ln_f(x))  # LM head tied to the token embedding

    def loss(self, tokens: mx.array, targets: mx.array) -> mx.array:
        """The spec's loss of the logits for `tokens` against `targets` (float32, a scalar)."""
        check_mx_targets(self.spec, tokens, targets)
        with mx.stream(self.device):
            return cross_entropy(self(tokens), targets)


def init_from_spec(model: nn.Module) -> None:
    """The spec's initialisation law (spec.params.init_law), drawn from MLX's RNG."""
    fresh = []
    for info in param_table(model.spec):
        mean, std = init_law(model.spec, info)
        fresh.append((info.name, mean + std * mx.random.normal(info.shape) if std else mx.full(info.shape, mean)))
    model.update(tree_unflatten(fresh))


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over targets != IGNORE_INDEX, computed in float32 whatever the logits' dtype."""
    logits = logits.astype(mx.float32)
    counted = targets != IGNORE_INDEX
    picked = mx.take_along_axis(logits, mx.where(counted, targets, 0)[..., None], axis=-1).squeeze(-1)
    return masked_mean(logsumexp(logits) - picked, counted)


def masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    """The mean of x where mask, as a first estimate plus the mean of what it missed.

    A plain float32 sum of ~100 losses of ~7 was off by up to 1.7e-7 of its value (the loss bound
    is 2e-7; torch's loss of the same logits was off by 2e-8). The deviations from a first estimate
    are small numbers with small rounding errors, which leaves the one rounding of the result.
    """
    n = mask.sum()
    estimate = mx.stop_gradient((x * mask).sum() / n)
    return estimate + ((x - estimate) * mask).sum() / n


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis, with the max subtracted and the sum taken in blocks."""
    peak = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(blocked_sum(mx.exp(x - peak))) + peak.squeeze(-1)


def blocked_sum(x: mx.array) -> mx.array:
    """Sum over the last axis as ~sqrt(n) sums of ~sqrt(n) terms.

    MLX's CPU reductions add one term at a time: over GPT-2's 50257 logits a float32 sum was off by
    up to 8.5e-6 of its value (biased low; torch's: 1.3e-7), which put the loss 2.4e-7 off against a
    bound of 2e-7 (SPEC.md section 9). In two levels of ~sqrt(n) terms it is off by at most 7.5e-7.
    """
    n = x.shape[-1]
    k = math.isqrt(n - 1) + 1 if n > 1 else 1
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k * k - n)])
    return padded.reshape(*x.shape[:-1], k, k).sum(axis=-1).sum(axis=-1)


# -- input checks: the rules live in spec/checks.py; here only the facts about mx arrays --------
def _values_known(a: mx.array) -> bool:
    """False inside mx.compile / mx.vmap, where arrays are placeholders whose values cannot be read."""
    try:
        mx.eval(a)
        return True
    except ValueError:
        return False


def _is_int(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.integer)


def _check_tokens(spec: ModelSpec, tokens: mx.array) -> None:
    ok = _is_int(tokens) and tokens.size > 0 and tokens.ndim == 2 and _values_known(tokens)
    lo, hi = (tokens.min().item(), tokens.max().item()) if ok else (0, 0)
    check_tokens(spec, tokens.shape, _is_int(tokens), lo, hi)


def check_mx_targets(spec: ModelSpec, tokens: mx.array, targets: mx.array) -> None:
    ok = _is_int(targets) and tuple(targets.shape) == tuple(tokens.shape) and _values_known(targets)
    if not ok:
        n, lo, hi = 1, 0, 0  # shape and dtype are checked below; values are unknown under mx.compile
    else:
        counted = targets != IGNORE_INDEX
        n = counted.sum().item()
        lo = mx.where(counted, targets, spec.vocab_size).min().item() if n else 0
        hi = mx.where(counted, targets, -1).max().item() if n else 0
    check_targets(spec, tokens.shape, targets.shape, _is_int(targets), n, lo, hi)
