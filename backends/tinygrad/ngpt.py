"""nGPT, the normalized Transformer (SPEC.md section 11), in plain tinygrad.

Attribute paths are the canonical names of the nGPT table; every matrix is kept unit-norm along
its embedding axis by `normalize_()`, which a training loop calls after each optimizer step.

    model = NGPT(spec)                                 # the spec's init law, drawn lazily
    loss = model.loss(tokens, targets)
    ... optimizer step ...
    model.normalize_()                                 # in place: optimizers keep their Tensors

Generation with a KV cache as for GPT (model.py): `model(tokens, cache)`; RoPE rotates q and k by
their absolute positions (the cache's offset onwards), and the cache keeps the keys as attention
uses them (rotated, normalized, scaled by s_qk).
"""
from __future__ import annotations

import math

from tinygrad import Tensor, UOp, nn

from ...spec import ModelSpec, canonical_dtype, param_table
from ...spec.params import init_law, ngpt_scales
from ...spec.rope import rope_angles
from .attention import cached_keys_values, causal_attention
from .model import LanguageModel, activated, embed_tokens, from_host


def unit_norm(x: Tensor, axis: int = -1) -> Tensor:
    """x / ||x||_2 along `axis`, no epsilon: SPEC.md 11's Norm (last axis) and 11.3's weight normalization.
    In float32, rounded back to x's dtype once, as the GPT-2 LayerNorm is: in half precision the
    squares, the square root and the division would each round."""
    x32 = x.float()
    return (x32 / (x32 * x32).sum(axis, keepdim=True).sqrt()).cast(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2j], x[2j+1]) of each position by its angles (T, D/2)."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return Tensor.stack(a * cos - b * sin, a * sin + b * cos, dim=-1).reshape(x.shape)


class RopeTables:
    """RoPE's cos and sin (n_positions, D/2) for every position: angles in float64, once (float32
    angles drift by ~1e-4 rad at position 1024), rounded to the compute dtype on the device on first
    use, then sliced at the positions of each call (symbolically in a replayed decoding step).
    __slots__, so no __dict__: nn.state.get_state_dict does not look inside, and the state stays canonical."""
    __slots__ = ("angles", "tables")

    def __init__(self, spec: ModelSpec):
        self.angles = rope_angles(spec.n_positions, spec.head_dim, spec.rope_base)
        self.tables: dict = {}

    def __call__(self, dtype, device: str) -> tuple[Tensor, Tensor]:
        if (key := (dtype, device)) not in self.tables:
            # rounded on the host to nearest even, as the weights are
            self.tables[key] = tuple(from_host(t, canonical_dtype(dtype), device).realize() for t in self.angles)
        return self.tables[key]


class Attention:
    def __init__(self, spec: ModelSpec):
        self.n_head = spec.n_head
        self.sqk_scale = ngpt_scales(spec)["ngpt_sqk"].multiplier
        self.c_attn = nn.Linear(spec.n_embd, 3 * spec.n_embd, bias=False)
        self.sqk = Tensor.empty(spec.n_embd)
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=False)

    def __call__(self, x: Tensor, cos_sin: tuple[Tensor, Tensor] | None, kv: Tensor | None = None,
                 start: int | UOp = 0) -> Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = [t.reshape(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2)]
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        sqk = (self.sqk * self.sqk_scale).reshape(1, H, 1, D)
        q, k = sqk * unit_norm(q), sqk * unit_norm(k)
        if kv is not None:  # keys as attention uses them: rotated at their own positions, normalized, scaled
            k, v = cached_keys_values(kv, k, v, start)
        y = causal_attention(q, k, v, math.sqrt(D))  # sqrt(d_k), not 1/sqrt
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP:
    def __init__(self, spec: ModelSpec):
        self.swiglu = spec.mlp == "swiglu"
        uv = (8 if self.swiglu else 4) * spec.n_embd
        self.suv_scale = ngpt_scales(spec)["ngpt_suv"].multiplier
        self.c_fc = nn.Linear(spec.n_embd, uv, bias=False)
        self.suv = Tensor.empty(uv)
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=False)

    def __call__(self, x: Tensor) -> Tensor:
        uv = self.c_fc(x) * (self.suv * self.suv_scale)
        # The nonlinearity in float32, rounded back to the dtype (as torch's half kernels do inside):
        # tinygrad builds sigmoid from exp2 and tanh as 2 sigmoid(2x) - 1 in the tensor's own dtype,
        # and s_uv's fixed sqrt(d) makes uv large. Measured in float16 (test-mini): gradients 6.1e-2 ->
        # 6.7e-3 of the reference with GELU (ngpt-seed), 1.7e-2 -> 6.7e-3 with SwiGLU (ngpt).
        if self.swiglu:
            u, g = uv.chunk(2, dim=-1)
            return self.c_proj(activated(u * g.float().silu().cast(g.dtype)))
        return self.c_proj(activated(uv.float().gelu().cast(uv.dtype)))  # tinygrad's gelu is the tanh form


class Block:
    def __init__(self, spec: ModelSpec):
        self.alpha_scale = ngpt_scales(spec)["ngpt_alpha"].multiplier
        self.abs_alpha = spec.ngpt_alpha == "abs"
        self.attn = Attention(spec)
        self.attn_alpha = Tensor.empty(spec.n_embd)
        self.mlp = MLP(spec)
        self.mlp_alpha = Tensor.empty(spec.n_embd)

    def _update(self, h: Tensor, h_new: Tensor, alpha: Tensor) -> Tensor:
        alpha = alpha * self.alpha_scale
        if self.abs_alpha:
            alpha = alpha.abs()  # x * sign(x): gradient sign(p), 0 at p = 0, as the spec has it
        a = unit_norm(h)  # h is unit-norm already, but the spec keeps the norm: it shapes the gradient
        return unit_norm(a + alpha * (unit_norm(h_new) - a))

    def __call__(self, h: Tensor, cos_sin, kv: Tensor | None = None, start: int | UOp = 0) -> Tensor:
        h = self._update(h, self.attn(h, cos_sin, kv, start), self.attn_alpha)
        return self._update(h, self.mlp(h), self.mlp_alpha)


class NGPT(LanguageModel):
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.sz_scale = ngpt_scales(spec)["ngpt_sz"].multiplier
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.h = [Block(spec) for _ in range(spec.n_layer)]
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        self.sz = Tensor.empty(spec.vocab_size)
        self._rope = RopeTables(spec) if spec.positions == "rope" else None
        # the spec's init law, lazy (free when loading replaces it): matrices N(0, 1/d) made unit-norm,
        # scaling vectors at their stored init
        state = nn.state.get_state_dict(self)
        for p in param_table(spec):
            mean, std = init_law(spec, p)
            w = Tensor.normal(*p.shape, mean=mean, std=std) if std else Tensor.full(p.shape, mean)
            state[p.name].replace(w if p.unit_norm_axis is None else unit_norm(w, p.unit_norm_axis))

    def normalize_(self) -> None:
        """SPEC.md 11.3, in place: each unit-norm matrix divided by its L2 norms along its embedding
        axis, in float32, rounded back to its dtype. Assigned into the same buffers, so optimizers
        and captured TinyJits keep seeing these Tensors."""
        state = nn.state.get_state_dict(self)
        unit = [(state[p.name], p.unit_norm_axis) for p in param_table(self.spec) if p.unit_norm_axis is not None]
        Tensor.realize(*(w for w, _ in unit))  # a lazy (freshly initialised) weight gets its buffer first
        Tensor.realize(*(w.assign(unit_norm(w, axis)) for w, axis in unit))

    def forward(self, tokens: Tensor, kv: list[Tensor] | None = None, start: int | UOp = 0,
                last_only: bool = False) -> Tensor:
        h = embed_tokens(self.spec, self.wte, tokens)  # no position table: positions enter through RoPE, or not at all
        cos_sin = None
        if self._rope is not None:  # the absolute positions start .. start+T-1, not the index within this call
            cos_sin = tuple(t[start:start + tokens.shape[1]] for t in self._rope(h.dtype, h.device))
        for i, block in enumerate(self.h):
            h = block(h, cos_sin, kv[i] if kv is not None else None, start)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h) * (self.sz * self.sz_scale)
