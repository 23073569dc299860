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

from ...spec import ModelSpec, param_table
from ...spec.checks import check_draws_layout, check_target_layout, check_token_layout
from ...spec.params import init_law
from .attention import KVCache, attention, cache_offset
from .losses import cross_entropy, early_exit_loss


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with SPEC.md 7's arithmetic: inner products accumulate in float32 and the result rounds once to
    the dtype. A float16 product on the CPU runs as a float32 GEMM, which is that arithmetic exactly (widening
    is exact): torch's float16 CPU GEMM, on a CPU without float16 instructions, was ~20x slower (GPT-2 124M's
    loss and gradients, B1xT64 on 2 cores: 13.6 s -> 0.63 s, bench/half_products.py). bfloat16 keeps torch's
    own (oneDNN's) kernels, the faster of the two there, and every product on a GPU is left to torch."""
    if x.dtype == torch.float16 and x.device.type == "cpu":
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) computing `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        # SPEC.md 17: without a value matrix, c_attn gives q and k only and there is no c_proj
        self.identity_values = spec.attention_values == "identity"
        self.head_reduce = spec.head_reduce
        n_out = (2 if self.identity_values else 3) * spec.n_embd
        self.c_attn = Linear(spec.n_embd, n_out, bias=spec.bias == "on")
        # SPEC.md 10.1: a learned sink logit per head, or softmax1's / softmax_c's constant ln c, or none
        self.learned_sinks, self.sink_logit = spec.attention == "learned_sinks", spec.sink_logit
        if self.learned_sinks:
            self.sinks = nn.Parameter(torch.zeros(spec.n_head))
        if not self.identity_values:
            self.c_proj = Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        qkv = self.c_attn(x).split(C, dim=2)
        # identity values: every head reads the whole input x, one (B, 1, T, C) tensor broadcast over heads
        v = x.unsqueeze(1) if self.identity_values else qkv[2].view(B, T, H, C // H).transpose(1, 2)
        q, k = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv[:2])
        if cache is not None:
            k, v = cache.update(k, v)
        sink = self.sinks if self.learned_sinks else None
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
        self.c_fc = Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias == "on")
        self.c_proj = Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias == "on")

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
        return self.streams(x, cache)[0]

    def streams(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, mid): the block's output and its intermediate stream, in the update form of SPEC.md 16.2."""
        n = self.ln_1(x)
        a = self.attn(n) if cache is None else self.attn(n, cache)  # attention stays callable as attn(x)
        if self.form == "parallel":
            mid = x + self.c_a * a
            return mid + self.mlp(self.ln_2(x)), mid
        if self.form == "multiplicative":
            mid = a * self.mlp(self.ln_2(x))
            return x + mid, mid
        mid = (n if self.form == "normed_residual" else x) + a
        m = self.mlp(self.ln_2(mid))
        if self.form == "escape_normed":
            return n + m, mid
        if self.form == "escape_residual":
            return x + m, mid
        return mid + m, mid  # sequential (GPT-2), normed_residual


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
        check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        return embed_tokens(self.spec, self.wte, tokens) + self.wpe(torch.arange(n, n + tokens.shape[1], device=tokens.device))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.ln_f(x), self.wte.weight)  # LM head tied to the token embedding

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
        check_targets(tokens, targets)
        check_draws(spec, tokens, draws)
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
            out, mid = block.streams(x)
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


# -- what the native call checks (SPEC.md 6): the arrays' metadata, never their values, so a check
# never waits for the device. Values (ids in range, draws in [0, 1)) are checked where data enters:
# the Backend methods, generate, the CLI.
def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_tokens(spec: ModelSpec, tokens: torch.Tensor) -> None:
    check_token_layout(spec, tokens.shape, _is_int(tokens))


def embed_tokens(spec: ModelSpec, wte: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """wte's rows for ids of any integer dtype (torch gathers with int32/int64 only), NaN for an id outside
    [0, vocab_size) (SPEC.md 6): the native call cannot check a value without a device sync, and a gather
    into the padded rows [vocab_size, padded_vocab_size) would give plausible logits."""
    if tokens.dtype not in (torch.int32, torch.int64):
        tokens = tokens.long()
    valid = (tokens >= 0) & (tokens < spec.vocab_size)
    return torch.where(valid[..., None], wte(tokens.clamp(0, spec.vocab_size - 1)), float("nan"))


def check_targets(tokens: torch.Tensor, targets: torch.Tensor) -> None:
    check_target_layout(tokens.shape, targets.shape, _is_int(targets))


def check_draws(spec: ModelSpec, tokens: torch.Tensor, draws: torch.Tensor | None) -> None:
    check_draws_layout(spec, tokens.shape, None if draws is None else draws.shape,
                       draws is None or draws.is_floating_point())
