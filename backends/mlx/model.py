"""GPT-2 as an mlx.nn.Module, built from a ModelSpec (SPEC.md sections 2-4, 10's attention sinks, and
16-19: shared blocks, the block forms, attention without values, the per-layer losses, a padded vocabulary).

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
from ...spec.checks import check_cache_room, check_draws, check_targets, check_tokens
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


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.scale = spec.head_dim ** -0.5
        # SPEC.md 17: with identity values c_attn makes q and k only, and there is no c_proj
        self.identity_values = spec.attention_values == "identity"
        self.head_reduce = spec.head_reduce
        self.c_attn = nn.Linear(spec.n_embd, (2 if self.identity_values else 3) * spec.n_embd, bias=spec.bias == "on")
        if spec.attention == "learned_sinks":
            self.sinks = mx.zeros((spec.n_head,))
            self._attend_learned = learned_sink_attention(self.scale)
        if not self.identity_values:
            self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")
        # softmax1 / softmax_c: a constant sink logit ln c per head (SPEC.md 10), never trained
        self._sink = {"softmax1": 0.0, "softmax_c": math.log(spec.softmax_c)}.get(spec.attention)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        heads = [t.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3)
                 for t in mx.split(self.c_attn(x), 2 if self.identity_values else 3, axis=-1)]
        q, k = heads[:2]
        v = x[:, None] if self.identity_values else heads[2]  # identity: one (B, 1, T, C) "head", x itself
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.identity_values:
            sinks = self.get("sinks")  # learned, else the constant ln c, if any
            if sinks is None and self._sink is not None:
                sinks = mx.full((self.n_head,), self._sink)
            return identity_value_attention(q, k, v[:, 0], self.scale, sinks, self.head_reduce)
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
        self.form = spec.block_form
        self.c_a = spec.parallel_attn_scale
        self.ln_1 = make_norm(spec)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = make_norm(spec)
        self.mlp = MLP(spec)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> tuple[mx.array, mx.array]:
        """-> the block's output and its intermediate stream "mid" (SPEC.md 16.2) for input x."""
        if self.form == "sequential":
            y = x + self.attn(self.ln_1(x), cache)
            return y + self.mlp(self.ln_2(y)), y
        if self.form == "parallel":  # attention and MLP both read x
            y = x + self.c_a * self.attn(self.ln_1(x), cache)
            return y + self.mlp(self.ln_2(x)), y
        if self.form == "multiplicative":
            am = self.attn(self.ln_1(x), cache) * self.mlp(self.ln_2(x))
            return x + am, am
        # the residual-through-norm forms: the normed input, not x, is (part of) what flows on
        n = self.ln_1(x)
        y = (n if self.form == "normed_residual" else x) + self.attn(n, cache)
        m = self.mlp(self.ln_2(y))
        return {"normed_residual": y, "escape_normed": n, "escape_residual": x}[self.form] + m, y


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec, device: mx.Device | None = None):
        super().__init__()
        self.spec = spec
        self.device = device or mx.default_device()  # where every call computes
        # SPEC.md 19: padded_vocab_size rows (nanoGPT's 50304); the padded ids are never predicted
        self.wte = nn.Embedding(spec.padded_vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        # SPEC.md 16.1: blocks="shared" holds the one block h.0, applied at every layer (block_prefix)
        self.h = [Block(spec) for _ in range(spec.n_layer if spec.blocks == "independent" else 1)]
        self.ln_f = make_norm(spec)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_from_spec(self)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.spec.n_layer)]  # per layer: a shared block has one per use

    def layers(self, tokens: mx.array, cache: list[KVCache] | None = None, local: bool = False):
        """Yield (input, mid, output) of each layer's block for (B, T) token ids, lazily. `local`: each
        block after the first reads its input through stop_gradient (loss="all_layers_local", SPEC.md 18.2)."""
        _check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        x = self.wte(tokens) + self.wpe(mx.arange(n, n + tokens.shape[1]))
        for i in range(self.spec.n_layer):
            if local and i > 0:
                x = mx.stop_gradient(x)
            out, mid = self.h[i if self.spec.blocks == "independent" else 0](x, cache[i] if cache else None)
            yield x, mid, out
            x = out

    def head(self, x: mx.array) -> mx.array:
        """ln_f, then the LM head tied to the token embedding: logits (..., padded_vocab_size)."""
        return self.wte.as_linear(self.ln_f(x))

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """The last layer's logits (B, T, padded_vocab_size) for (B, T) token ids. With `cache` (from
        make_cache()), the tokens sit at the positions after those in it, which they join; `last_only`:
        the last position's only."""
        with mx.stream(self.device):
            for _, _, x in self.layers(tokens, cache):
                pass
            return self.head(x[:, -1:] if last_only else x)

    def loss(self, tokens: mx.array, targets: mx.array, draws: mx.array | None = None) -> mx.array:
        """The spec's loss (SPEC.md 4 and 18: spec.loss) for `tokens` against `targets`, float32, a scalar.
        `draws`: loss="early_exit"'s uniforms in [0, 1), (n_layer, B, T); None for the other losses."""
        check_mx_targets(self.spec, tokens, targets)
        _check_draws(self.spec, tokens, draws)
        return self.loss_and_logits(tokens, targets, draws)[0]

    def loss_and_logits(self, tokens: mx.array, targets: mx.array,
                        draws: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """loss() (its inputs unchecked) and the last layer's logits, from one forward."""
        spec = self.spec
        with mx.stream(self.device):
            outs = [out for _, _, out in self.layers(tokens, local=spec.loss == "all_layers_local")]
            logits = [self.head(h) for h in (outs if spec.loss != "final" else outs[-1:])]
            real = [z[..., : spec.vocab_size] for z in logits]  # SPEC.md 19: padded ids carry no probability
            if spec.loss == "early_exit":
                loss = early_exit_loss(real, targets, mx.array(draws))
            else:  # "final": the last layer; the all-layer losses: the sum over layers
                loss = sum(cross_entropy(z, targets) for z in real)
            return loss, logits[-1]

    def residual_stats(self, tokens: mx.array) -> dict[str, mx.array]:
        """SPEC.md 18.4: per layer (n_layer,), the mean over (b, t) of the Bessel-corrected std over
        channels of the block's input, its mid stream, its output and ln_f of its output (float32)."""
        def size(x):
            return mx.std(x.astype(mx.float32), axis=-1, ddof=1).mean()

        with mx.stream(self.device):
            rows = [(size(x), size(mid), size(out), size(self.ln_f(out))) for x, mid, out in self.layers(tokens)]
            return {name: mx.stack(col) for name, col in zip(("input", "mid", "output", "normed"), zip(*rows))}


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


def early_exit_loss(layer_logits: list[mx.array], targets: mx.array, draws: mx.array) -> mx.array:
    """SPEC.md 18.3, in float32 whatever the logits' dtype. Position (b, t) exits at layer l when
    draws[l] < p_max_l (the last layer exits all still active); each layer adds, over the counted
    positions, active * factor * conf / n_counted with conf = -log(1 - p_max) and factor = the
    cross-entropy at the exit layer, else 1. Exits and the active mask are decisions: no gradient."""
    counted = targets != IGNORE_INDEX
    ids = mx.where(counted, targets, 0)[..., None]
    active = mx.ones(targets.shape, dtype=mx.bool_)
    total = mx.array(0.0)
    for layer, z in enumerate(layer_logits):
        z = z.astype(mx.float32)
        # p_max = 1 / s with s = sum exp(z - max): the log p_max = max - logsumexp form would lose
        # ~ulp(logsumexp) of it, relatively, where p_max is small (untrained weights). The max keeps
        # its gradient: p_max depends on it.
        peak = z.max(axis=-1)
        s = blocked_sum(mx.exp(z - peak[..., None]))
        p_max = 1 / s
        conf = -mx.log1p(-p_max)
        xe = mx.log(s) + (peak - mx.take_along_axis(z, ids, axis=-1).squeeze(-1))
        exits = draws[layer] < mx.stop_gradient(p_max) if layer < len(layer_logits) - 1 else mx.ones_like(active)
        factor = mx.where(active & exits, xe, 1.0)
        total = total + masked_mean(mx.where(active, factor * conf, 0.0), counted)
        active = active & ~exits
    return total


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


def _check_draws(spec: ModelSpec, tokens: mx.array, draws) -> None:
    if draws is None:
        return check_draws(spec, tokens.shape, None)
    draws = mx.array(draws)
    is_float = mx.issubdtype(draws.dtype, mx.floating)
    known = is_float and draws.size > 0 and _values_known(draws)
    lo, hi = (draws.min().item(), draws.max().item()) if known else (0.0, 0.0)
    check_draws(spec, tokens.shape, draws.shape, is_float, lo, hi)


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
