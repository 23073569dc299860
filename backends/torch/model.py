"""GPT-2 as a plain torch.nn.Module, built from a ModelSpec (SPEC.md sections 2-4).

Parameter names are the spec's canonical names (`model.state_dict()` is a canonical
state), Linear weights are (out, in) as nn.Linear keeps them, and the LM head is the
token embedding itself, so there is no `lm_head` to tie.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...spec import IGNORE_INDEX, ModelSpec, param_table
from ...spec.checks import check_cache_room, check_draws, check_targets, check_tokens
from ...spec.params import init_law


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
    zero = q.new_zeros(B, H, 1, D)
    return F.scaled_dot_product_attention(q, torch.cat([zero, k], 2), torch.cat([zero, v], 2), attn_mask=mask,
                                          scale=scale)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        # SPEC.md 17: without a value matrix, c_attn gives q and k only and there is no c_proj
        self.identity_values = spec.attention_values == "identity"
        self.head_reduce = spec.head_reduce
        n_out = (2 if self.identity_values else 3) * spec.n_embd
        self.c_attn = nn.Linear(spec.n_embd, n_out, bias=spec.bias == "on")
        if spec.attention == "learned_sinks":
            self.sinks = nn.Parameter(torch.zeros(spec.n_head))
        if not self.identity_values:
            self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")
        # softmax1 / softmax_c: a constant sink logit ln c (SPEC.md 10.1)
        self.sink_logit = {"softmax1": 0.0, "softmax_c": math.log(spec.softmax_c)}.get(spec.attention)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        qkv = self.c_attn(x).split(C, dim=2)
        # identity values: every head reads the whole input x, one (B, 1, T, C) tensor broadcast over heads
        v = x.unsqueeze(1) if self.identity_values else qkv[2].view(B, T, H, C // H).transpose(1, 2)
        q, k = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv[:2])
        if cache is not None:
            k, v = cache.update(k, v)
        sink = self.sinks if hasattr(self, "sinks") else None
        if self.sink_logit is not None:
            sink = q.new_full((H,), self.sink_logit)
        if self.identity_values:  # SDPA takes a value width other than the head's; broadcast v over heads
            y = attention(q, k, v.expand(B, H, *v.shape[2:]), scale=1 / math.sqrt(C // H), sink=sink)
            return y.sum(1) if self.head_reduce == "sum" else y.mean(1)
        y = attention(q, k, v, sink=sink)  # scale 1/sqrt(head_dim)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias == "on")
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias == "on")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def make_norm(spec: ModelSpec) -> nn.Module:
    """SPEC.md 3 and 14: the spec's norm, its eps always explicit (the frameworks' defaults differ)."""
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.n_embd, eps=spec.norm_eps)
    return nn.LayerNorm(spec.n_embd, eps=spec.norm_eps, elementwise_affine=spec.norm == "layernorm",
                        bias=spec.bias == "on")


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.form, self.c_a = spec.block_form, spec.parallel_attn_scale
        self.ln_1 = make_norm(spec)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.streams(x, cache)[1]

    def streams(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mid, out): the block's intermediate stream and its output, in the update form of SPEC.md 16.2."""
        n = self.ln_1(x)
        a = self.attn(n) if cache is None else self.attn(n, cache)  # attention stays callable as attn(x)
        if self.form == "parallel":
            mid = x + self.c_a * a
            return mid, mid + self.mlp(self.ln_2(x))
        if self.form == "multiplicative":
            mid = a * self.mlp(self.ln_2(x))
            return mid, x + mid
        mid = (n if self.form == "normed_residual" else x) + a
        m = self.mlp(self.ln_2(mid))
        if self.form == "escape_normed":
            return mid, n + m
        if self.form == "escape_residual":
            return mid, x + m
        return mid, mid + m  # sequential (GPT-2), normed_residual


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.padded_vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        # blocks="shared": one block, applied n_layer times (SPEC.md 16.1)
        self.h = nn.ModuleList(Block(spec) for _ in range(spec.n_layer if spec.blocks == "independent" else 1))
        self.ln_f = make_norm(spec)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_from_spec(self)

    def layers(self):
        """The block each of the n_layer layers applies."""
        return [self.h[i if len(self.h) > 1 else 0] for i in range(self.spec.n_layer)]

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in range(self.spec.n_layer)]

    def embed(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            _check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        return self.wte(tokens) + self.wpe(torch.arange(n, n + tokens.shape[1], device=tokens.device))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(x), self.wte.weight)  # LM head tied to the token embedding

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) of the last layer for (B, T) token ids. With `cache` (from
        make_cache()), the tokens sit at the positions after those in it, which they join; `last_only`:
        the last position's only."""
        x = self.embed(tokens, cache)
        for i, block in enumerate(self.layers()):
            x = block(x, cache[i] if cache else None)
        return self.head(x[:, -1:] if last_only else x)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        """The spec's loss (SPEC.md 4 and 18); `draws` (n_layer, B, T): the uniforms of loss="early_exit"."""
        return self.loss_and_logits(tokens, targets, draws)[0]

    def loss_and_logits(self, tokens, targets, draws=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the last layer's logits) from one forward pass."""
        spec = self.spec
        if not torch.compiler.is_compiling():
            check_targets_tensor(spec, tokens, targets)
            _check_draws(spec, tokens, draws)
        x = self.embed(tokens)
        if spec.loss == "final":
            for block in self.layers():
                x = block(x)
            logits = self.head(x)
            return cross_entropy(logits, targets, spec.vocab_size), logits
        layer_logits = []
        for i, block in enumerate(self.layers()):
            # all_layers_local: each layer's loss trains that layer only (SPEC.md 18.2)
            x = block(x.detach() if spec.loss == "all_layers_local" and i > 0 else x)
            layer_logits.append(self.head(x))
        if spec.loss == "early_exit":
            return early_exit_loss(layer_logits, targets, draws, spec.vocab_size), layer_logits[-1]
        return sum(cross_entropy(z, targets, spec.vocab_size) for z in layer_logits), layer_logits[-1]

    @torch.no_grad()
    def residual_stats(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """SPEC.md 18.4 ("SIZE COMPARISON"): per layer, the mean over positions of the Bessel-corrected
        std over channels of the block's input, intermediate stream, output and ln_f(output)."""
        def size(t):
            return t.float().std(-1).mean()  # torch's std is Bessel-corrected (ddof=1) by default

        x, rows = self.embed(tokens), []
        for block in self.layers():
            mid, out = block.streams(x)
            rows.append(torch.stack([size(x), size(mid), size(out), size(self.ln_f(out))]))
            x = out
        return dict(zip(("input", "mid", "output", "normed"), torch.stack(rows).T))


@torch.no_grad()
def init_from_spec(model: nn.Module) -> None:
    """The spec's initialisation law (spec.params.init_law), drawn from torch's RNG."""
    params = dict(model.named_parameters())
    for info in param_table(model.spec):
        mean, std = init_law(model.spec, info)
        if std:
            params[info.name].normal_(mean, std)
        else:
            params[info.name].fill_(mean)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over targets != IGNORE_INDEX, computed in float32 whatever the logits' dtype,
    over the first `vocab_size` logits (SPEC.md 19: padded ids carry no probability)."""
    return F.cross_entropy(logits[..., :vocab_size].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def early_exit_loss(layer_logits: list[torch.Tensor], targets: torch.Tensor, draws: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
    """SPEC.md 18.3, in float32: at each layer a position still active exits where its draw is below its top
    probability p_max (always at the last layer); it adds conf = -log(1 - p_max) at every layer it is active,
    times its cross-entropy at the layer it exits. Decisions are constants: no gradient flows through them."""
    counted = targets != IGNORE_INDEX
    safe_t = targets.clamp_min(0).unsqueeze(-1)
    active = torch.ones_like(counted)
    total = 0.0
    for i, z in enumerate(layer_logits):
        z = z[..., :vocab_size].float()
        lse = z.logsumexp(-1)
        p_max = torch.exp(z.amax(-1) - lse)
        conf = -torch.log1p(-p_max)
        exits = (draws[i] < p_max.detach()) if i < len(layer_logits) - 1 else torch.ones_like(counted)
        just = active & exits
        xe = lse - z.gather(-1, safe_t).squeeze(-1)
        factor = torch.where(just, xe, torch.ones_like(xe))
        total = total + (factor * conf)[active & counted].sum()
        active = active & ~exits
    return total / counted.sum()


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_tokens(spec: ModelSpec, tokens: torch.Tensor) -> None:
    ok = _is_int(tokens) and tokens.numel() > 0
    lo, hi = (int(tokens.min()), int(tokens.max())) if ok else (0, 0)
    check_tokens(spec, tokens.shape, _is_int(tokens), lo, hi)


def _check_draws(spec: ModelSpec, tokens: torch.Tensor, draws: torch.Tensor | None) -> None:
    if draws is None:
        return check_draws(spec, tokens.shape, None)
    known = draws.is_floating_point() and draws.numel() > 0
    lo, hi = (float(draws.min()), float(draws.max())) if known else (0.0, 0.0)
    check_draws(spec, tokens.shape, draws.shape, draws.is_floating_point(), lo, hi)


def check_targets_tensor(spec: ModelSpec, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    ok = _is_int(targets)
    counted = targets[targets != IGNORE_INDEX] if ok else targets.flatten()[:0]
    lo, hi = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
    check_targets(spec, tokens.shape, targets.shape, ok, counted.numel(), lo, hi)
