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
from ...spec.checks import check_cache_room, check_targets, check_tokens
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
            B, H, _, D = k.shape
            size = -(-(n + t) // self.step) * self.step
            grown = [k.new_zeros(B, H, size, D), v.new_zeros(B, H, size, D)]
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
        self.c_attn = nn.Linear(spec.n_embd, 3 * spec.n_embd, bias=spec.bias == "on")
        if spec.attention == "learned_sinks":
            self.sinks = nn.Parameter(torch.zeros(spec.n_head))
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")
        # softmax1 / softmax_c: a constant sink logit ln c (SPEC.md 10.1)
        self.sink_logit = {"softmax1": 0.0, "softmax_c": math.log(spec.softmax_c)}.get(spec.attention)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v)
        sink = self.sinks if hasattr(self, "sinks") else None
        if self.sink_logit is not None:
            sink = q.new_full((self.n_head,), self.sink_logit)
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
        self.ln_1 = make_norm(spec)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        a = self.ln_1(x)  # a cache only when there is one: attention stays callable as attn(x)
        x = x + (self.attn(a) if cache is None else self.attn(a, cache))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        self.h = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = make_norm(spec)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_from_spec(self)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size) for (B, T) token ids. With `cache` (from make_cache()), the tokens
        sit at the positions after those in it, which they join; `last_only`: the last position's only."""
        if not torch.compiler.is_compiling():
            _check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        pos = torch.arange(n, n + tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache else None)
        if last_only:
            x = x[:, -1:]
        return F.linear(self.ln_f(x), self.wte.weight)  # LM head tied to the token embedding

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The spec's loss of the logits for `tokens` against `targets`."""
        if not torch.compiler.is_compiling():
            check_targets_tensor(self.spec, tokens, targets)
        return cross_entropy(self(tokens), targets)


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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != IGNORE_INDEX, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_tokens(spec: ModelSpec, tokens: torch.Tensor) -> None:
    ok = _is_int(tokens) and tokens.numel() > 0
    lo, hi = (int(tokens.min()), int(tokens.max())) if ok else (0, 0)
    check_tokens(spec, tokens.shape, _is_int(tokens), lo, hi)


def check_targets_tensor(spec: ModelSpec, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    ok = _is_int(targets)
    counted = targets[targets != IGNORE_INDEX] if ok else targets.flatten()[:0]
    lo, hi = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
    check_targets(spec, tokens.shape, targets.shape, ok, counted.numel(), lo, hi)
