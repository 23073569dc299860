"""nGPT, the normalized Transformer (SPEC.md section 11), as a torch.nn.Module.

Names follow the canonical table (and NVIDIA's code): every matrix is kept unit-norm along
its embedding axis by `normalize_()`, which a training loop calls after each optimizer step.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...spec import ModelSpec, param_table
from ...spec.params import ngpt_scales
from ...spec.rope import rope_angles
from .attention import KVCache, attention, cache_offset
from .losses import cross_entropy
from .model import Linear, check_draws, check_targets, check_tokens, embed_tokens, init_from_spec


def justnorm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)  # no epsilon, as the spec (and NVIDIA) define Norm


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position's angles."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.sqk_scale = ngpt_scales(spec)["ngpt_sqk"].multiplier
        self.c_attn = Linear(spec.n_embd, 3 * spec.n_embd, bias=False)
        self.sqk = nn.Parameter(torch.empty(spec.n_embd))
        self.c_proj = Linear(spec.n_embd, spec.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos_sin, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        sqk = (self.sqk * self.sqk_scale).view(1, H, 1, D)
        q, k = sqk * justnorm(q), sqk * justnorm(k)
        if cache is not None:  # keys as attention uses them: rotated at their own positions, normalized
            k, v = cache.update(k, v)
        y = attention(q, k, v, scale=math.sqrt(D))  # sqrt(d_k), not 1/sqrt
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        uv = 8 * spec.n_embd if self.swiglu else 4 * spec.n_embd
        self.suv_scale = ngpt_scales(spec)["ngpt_suv"].multiplier
        self.c_fc = Linear(spec.n_embd, uv, bias=False)
        self.suv = nn.Parameter(torch.empty(uv))
        self.c_proj = Linear(4 * spec.n_embd, spec.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uv = self.c_fc(x) * (self.suv * self.suv_scale)
        if self.swiglu:
            u, v = uv.chunk(2, dim=-1)
            return self.c_proj(u * F.silu(v))
        return self.c_proj(F.gelu(uv, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.alpha_scale = ngpt_scales(spec)["ngpt_alpha"].multiplier
        self.abs_alpha = spec.ngpt_alpha == "abs"
        self.attn = Attention(spec)
        self.attn_alpha = nn.Parameter(torch.empty(spec.n_embd))
        self.mlp = MLP(spec)
        self.mlp_alpha = nn.Parameter(torch.empty(spec.n_embd))

    def _update(self, h, h_new, alpha):
        alpha = alpha * self.alpha_scale
        alpha = alpha.abs() if self.abs_alpha else alpha
        a = justnorm(h)  # h is unit-norm already, but the spec keeps the norm: it shapes the gradient
        return justnorm(a + alpha * (justnorm(h_new) - a))

    def forward(self, h: torch.Tensor, cos_sin, cache: KVCache | None = None) -> torch.Tensor:
        y = self.attn(h, cos_sin) if cache is None else self.attn(h, cos_sin, cache)  # as model.Block
        h = self._update(h, y, self.attn_alpha)
        return self._update(h, self.mlp(h), self.mlp_alpha)


class NGPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.sz_scale = ngpt_scales(spec)["ngpt_sz"].multiplier
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.h = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.lm_head = Linear(spec.n_embd, spec.vocab_size, bias=False)
        self.sz = nn.Parameter(torch.empty(spec.vocab_size))
        # RoPE angles in float64 once (float32 angles drift by ~1e-4 rad at position 1024),
        # rounded to the model's dtype on use; plain arrays, so the state dict stays canonical
        self._rope = rope_angles(spec.n_positions, spec.head_dim, spec.rope_base) if spec.positions == "rope" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_from_spec(self)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """SPEC.md 11.3, in place: each matrix unit-norm along its embedding axis, computed in float32."""
        params = dict(self.named_parameters())
        for info in param_table(self.spec):
            if info.unit_norm_axis is not None:
                w = params[info.name]
                w32 = w.float()
                w.copy_(w32 / w32.norm(dim=info.unit_norm_axis, keepdim=True))

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size); `cache` and `last_only` as GPT.forward has them."""
        check_tokens(self.spec, tokens)
        n = cache_offset(self.spec, tokens, cache)
        h = embed_tokens(self.spec, self.wte, tokens)
        cos_sin = None
        if self._rope is not None:  # absolute positions n .. n+T-1, not the index within this call
            w = self.wte.weight
            cos_sin = tuple(torch.from_numpy(t[n : n + tokens.shape[1]].astype(np.float32)).to(device=w.device, dtype=w.dtype)
                            for t in self._rope)
        for i, block in enumerate(self.h):
            h = block(h, cos_sin, cache[i] if cache else None)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h) * (self.sz * self.sz_scale)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, draws: None = None) -> torch.Tensor:
        """The spec's loss (nGPT's is "final": no draws), float32."""
        return self.loss_and_logits(tokens, targets, draws)[0]

    def loss_and_logits(self, tokens: torch.Tensor, targets: torch.Tensor,
                        draws: None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) from one forward, as GPT.loss_and_logits."""
        check_targets(tokens, targets)
        check_draws(self.spec, tokens, draws)
        logits = self(tokens)
        return cross_entropy(logits, targets), logits
