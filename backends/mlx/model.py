"""GPT-2 as an mlx.nn.Module, built from a ModelSpec (SPEC.md sections 2-4, 10's attention sinks, and
16-19: shared blocks, the block forms, attention without values, the per-layer losses, a padded vocabulary).

The parameter tree flattens to the spec's canonical names (`h.0.attn.c_attn.weight`, ...),
Linear weights are (out, in) as nn.Linear keeps them, and the LM head is the token embedding
itself (`linear(x, wte.weight)`, as `wte.as_linear`), so there is no `lm_head` to tie.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ...spec import ModelSpec, param_table
from ...spec.checks import check_draws_layout, check_target_layout, check_token_layout
from ...spec.params import init_law
from .attention import KVCache, cache_offset, identity_value_attention, learned_sink_attention
from .losses import cross_entropy, early_exit_loss


_HALF = (mx.float16, mx.bfloat16)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias), as nn.Linear computes it, with SPEC.md 7's arithmetic: inner products accumulate in
    float32 and the result rounds once to the dtype. A half-precision product on the CPU runs as a float32 GEMM,
    which is that arithmetic exactly (widening is exact): MLX's own half-precision CPU matmul does not use BLAS and
    was 7-8x slower (GPT-2 124M's loss and gradients, B1xT64 on 2 cores: bfloat16 8.6 s -> 1.1 s, float16
    11.9 s -> 1.6 s, bench/half_products.py). On a GPU, and in float32, MLX's own product."""
    if x.dtype in _HALF and mx.default_device() == mx.cpu:
        wide = x.astype(mx.float32), weight.astype(mx.float32).T
        y = wide[0] @ wide[1] if bias is None else mx.addmm(bias.astype(mx.float32), *wide)
        return y.astype(x.dtype)
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


class Linear(nn.Linear):
    """nn.Linear (the same parameters) computing `linear`."""

    def __call__(self, x: mx.array) -> mx.array:
        return linear(x, self["weight"], self["bias"] if "bias" in self else None)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.scale = spec.head_dim ** -0.5
        # SPEC.md 17: with identity values c_attn makes q and k only, and there is no c_proj
        self.identity_values = spec.attention_values == "identity"
        self.head_reduce = spec.head_reduce
        self.c_attn = Linear(spec.n_embd, (2 if self.identity_values else 3) * spec.n_embd, bias=spec.bias == "on")
        # SPEC.md 10.1: a learned sink logit per head, or softmax1's / softmax_c's constant ln c, or none
        self.learned_sinks, self.sink_logit = spec.attention == "learned_sinks", spec.sink_logit
        if self.learned_sinks:
            self.sinks = mx.zeros((spec.n_head,))
            self._attend_learned = learned_sink_attention(self.scale)
        if not self.identity_values:
            self.c_proj = Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        heads = [t.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3)
                 for t in mx.split(self.c_attn(x), 2 if self.identity_values else 3, axis=-1)]
        q, k = heads[:2]
        v = x[:, None] if self.identity_values else heads[2]  # identity: one (B, 1, T, C) "head", x itself
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.identity_values:
            sinks = self.sinks if self.learned_sinks else None
            if self.sink_logit is not None:
                sinks = mx.full((self.n_head,), self.sink_logit)
            return identity_value_attention(q, k, v[:, 0], self.scale, sinks, self.head_reduce)
        # MLX aligns "causal" bottom-right: query i of T sees keys 0 .. L-T+i, the spec's mask both
        # without a cache (L == T) and with one (the new queries follow the L-T cached positions).
        # `sinks=` is SPEC.md 10's sink exactly: a logit per head, not scaled, with a zero value.
        # MLX requires it in q's dtype, so a constant ln c is rounded to it (as torch's mask is).
        if self.learned_sinks:
            y = self._attend_learned(q, k, v, self.sinks)
        else:
            sinks = None if self.sink_logit is None else mx.full((self.n_head,), self.sink_logit, q.dtype)
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal", sinks=sinks)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias == "on")
        self.c_proj = Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias == "on")

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
        check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        x = embed(self.spec, self.wte, tokens) + self.wpe(mx.arange(n, n + tokens.shape[1]))
        for i in range(self.spec.n_layer):
            if local and i > 0:
                x = mx.stop_gradient(x)
            out, mid = self.h[i if self.spec.blocks == "independent" else 0](x, cache[i] if cache else None)
            yield x, mid, out
            x = out

    def head(self, x: mx.array) -> mx.array:
        """ln_f, then the LM head tied to the token embedding: logits (..., padded_vocab_size)."""
        return linear(self.ln_f(x), self.wte.weight)  # wte.as_linear, through `linear`

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
        return self.loss_and_logits(tokens, targets, draws)[0]

    def loss_and_logits(self, tokens: mx.array, targets: mx.array,
                        draws: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """loss() and the last layer's logits, from one forward."""
        spec = self.spec
        check_targets(tokens, targets)
        check_draws(spec, tokens, draws)
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


# -- what the native call checks (SPEC.md 6): the arrays' metadata, never their values, so a check
# neither waits for the device nor breaks mx.compile. Values (ids in range, draws in [0, 1)) are
# checked where data enters: the Backend methods, generate, the CLI.
def _is_int(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.integer)


def check_tokens(spec: ModelSpec, tokens: mx.array) -> None:
    check_token_layout(spec, tokens.shape, _is_int(tokens))


def embed(spec: ModelSpec, wte: nn.Embedding, tokens: mx.array) -> mx.array:
    """wte's rows for the ids, NaN for an id outside [0, vocab_size) (SPEC.md 6): a native call, compiled
    or not, cannot raise on a value without a device sync, and a gather out of range is silently wrong."""
    if tokens.dtype.size < 4:  # int8/uint8/int16/uint16: vocab_size need not fit their range
        tokens = tokens.astype(mx.int32)
    valid = (tokens >= 0) & (tokens < spec.vocab_size)
    return mx.where(valid[..., None], wte(mx.clip(tokens, 0, spec.vocab_size - 1)), mx.array(float("nan"), wte.weight.dtype))


def check_targets(tokens: mx.array, targets: mx.array) -> None:
    check_target_layout(tokens.shape, targets.shape, _is_int(targets))


def check_draws(spec: ModelSpec, tokens: mx.array, draws) -> None:
    shape = None if draws is None else tuple(draws.shape)
    check_draws_layout(spec, tokens.shape, shape, draws is None or mx.issubdtype(mx.array(draws).dtype, mx.floating))
