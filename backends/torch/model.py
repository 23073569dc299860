"""GPT-2 as a plain torch.nn.Module, built from a ModelSpec (SPEC.md sections 2-4).

Parameter names are the spec's canonical names (`model.state_dict()` is a canonical
state), Linear weights are (out, in) as nn.Linear keeps them, and the LM head is the
token embedding itself, so there is no `lm_head` to tie.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...spec import IGNORE_INDEX, ModelSpec, param_table
from ...spec.checks import check_targets, check_tokens
from ...spec.params import gpt2_init


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.c_attn = nn.Linear(spec.n_embd, 3 * spec.n_embd)
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd)
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.n_embd, eps=spec.norm_eps)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = nn.LayerNorm(spec.n_embd, eps=spec.norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        self.h = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.n_embd, eps=spec.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation (the spec's law, drawn from torch's RNG)."""
        params = dict(self.named_parameters())
        for info in param_table(self.spec):
            mean, std = gpt2_init(self.spec, info)
            if std:
                params[info.name].normal_(mean, std)
            else:
                params[info.name].fill_(mean)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for (B, T) token ids."""
        if not torch.compiler.is_compiling():
            _check_tokens(self.spec, tokens)
        T = tokens.shape[1]
        pos = torch.arange(T, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # LM head tied to the token embedding

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The spec's loss of the logits for `tokens` against `targets`."""
        if not torch.compiler.is_compiling():
            check_targets_tensor(self.spec, tokens, targets)
        return cross_entropy(self(tokens), targets)


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
