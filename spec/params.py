"""The canonical parameter table: every parameter's name, shape and role.

It is derived from a ModelSpec and is the single source of truth for the
reference, every backend, the weight files and the Hugging Face mapping.
Linear weights are stored (out_features, in_features): y = x @ W.T + b.
In GPT-2 the LM head is tied to `wte.weight` and has no entry of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .config import ModelSpec

# Roles decide initialisation (init_law, weights/synthetic.py) and, later, weight decay.
ROLES = (
    "token_embedding",   # wte: input embedding (and, in GPT-2, the tied LM head)
    "output_embedding",  # lm_head (nGPT: untied)
    "position_embedding",
    "linear",            # a weight read from the residual stream
    "residual_linear",   # a weight writing into the residual stream (GPT-2's scaled init)
    "bias",
    "norm_gain",
    "norm_bias",
    "attention_sink",    # learned sink logits, one per head
    "ngpt_alpha",        # nGPT's learned eigen learning rates alpha_A, alpha_M
    "ngpt_sqk",          # nGPT's s_qk
    "ngpt_suv",          # nGPT's s_uv
    "ngpt_sz",           # nGPT's s_z
)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    role: str
    # Hugging Face GPT-2 stores this weight as a Conv1D, i.e. transposed (in, out).
    hf_transposed: bool = False
    # nGPT keeps this matrix unit-norm along its embedding axis: 1 = each row, 0 = each column.
    unit_norm_axis: int | None = None


@lru_cache(maxsize=64)
def _table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    return _ngpt_table(spec) if spec.architecture == "ngpt" else _gpt2_table(spec)


def _gpt2_table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    C, V, P = spec.n_embd, spec.padded_vocab_size, spec.n_positions
    rows = [
        ParamInfo("wte.weight", (V, C), "token_embedding"),
        ParamInfo("wpe.weight", (P, C), "position_embedding"),
    ]

    def linear(prefix, n_out, n_in, role):
        rows.append(ParamInfo(f"{prefix}.weight", (n_out, n_in), role, hf_transposed=True))
        if spec.bias == "on":
            rows.append(ParamInfo(f"{prefix}.bias", (n_out,), "bias"))

    def norm(prefix):  # SPEC.md 14: a parameter-free LayerNorm has none, RMSNorm a gain only
        if spec.norm != "layernorm_noaffine":
            rows.append(ParamInfo(f"{prefix}.weight", (C,), "norm_gain"))
        if spec.norm == "layernorm" and spec.bias == "on":
            rows.append(ParamInfo(f"{prefix}.bias", (C,), "norm_bias"))

    identity_values = spec.attention_values == "identity"  # SPEC.md 17: q and k only, no c_proj
    for i in range(spec.n_layer if spec.blocks == "independent" else 1):  # SPEC.md 16: shared = h.0 only
        h = f"h.{i}"
        norm(f"{h}.ln_1")
        linear(f"{h}.attn.c_attn", (2 if identity_values else 3) * C, C, "linear")
        if spec.attention == "learned_sinks":
            rows.append(ParamInfo(f"{h}.attn.sinks", (spec.n_head,), "attention_sink"))
        if not identity_values:
            linear(f"{h}.attn.c_proj", C, C, "residual_linear")
        norm(f"{h}.ln_2")
        linear(f"{h}.mlp.c_fc", 4 * C, C, "linear")
        linear(f"{h}.mlp.c_proj", C, 4 * C, "residual_linear")
    norm("ln_f")
    return tuple(rows)


def _ngpt_table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    C, V = spec.n_embd, spec.vocab_size
    uv = 8 * C if spec.mlp == "swiglu" else 4 * C  # SwiGLU's c_fc gives u and v, 4C each
    rows = [ParamInfo("wte.weight", (V, C), "token_embedding", unit_norm_axis=1)]
    for i in range(spec.n_layer):
        h = f"h.{i}"
        rows += [
            ParamInfo(f"{h}.attn.c_attn.weight", (3 * C, C), "linear", unit_norm_axis=1),
            ParamInfo(f"{h}.attn.sqk", (C,), "ngpt_sqk"),
            ParamInfo(f"{h}.attn.c_proj.weight", (C, C), "residual_linear", unit_norm_axis=0),
            ParamInfo(f"{h}.attn_alpha", (C,), "ngpt_alpha"),
            ParamInfo(f"{h}.mlp.c_fc.weight", (uv, C), "linear", unit_norm_axis=1),
            ParamInfo(f"{h}.mlp.suv", (uv,), "ngpt_suv"),
            ParamInfo(f"{h}.mlp.c_proj.weight", (C, 4 * C), "residual_linear", unit_norm_axis=0),
            ParamInfo(f"{h}.mlp_alpha", (C,), "ngpt_alpha"),
        ]
    rows += [
        ParamInfo("lm_head.weight", (V, C), "output_embedding", unit_norm_axis=1),
        ParamInfo("sz", (V,), "ngpt_sz"),
    ]
    return tuple(rows)


def param_table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    """The parameters of `spec`, in canonical order."""
    return _table(spec)


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in _table(spec)}


@dataclass(frozen=True)
class NGPTScale:
    """An nGPT scaling vector: stored p, initialised to `init`; the model uses p * `multiplier`."""
    init: float
    multiplier: float


def ngpt_scales(spec: ModelSpec) -> dict[str, NGPTScale]:
    """SPEC.md section 11: the stored-parameter / effective-value reparametrisation of nGPT.

    effective = stored * (s_init / s_scale), stored initialised to s_scale; s_uv also takes a
    fixed extra sqrt(d). ngpt_scale chooses s_scale of s_qk and s_z: d^-1/2 (NVIDIA) or d^-1 (seed).
    """
    d = spec.n_embd
    qz = d**-0.5 if spec.ngpt_scale == "inv_sqrt_d" else 1.0 / d
    return {
        "ngpt_alpha": NGPTScale(d**-0.5, 0.05 / d**-0.5),
        "ngpt_sqk": NGPTScale(qz, 1.0 / qz),
        "ngpt_suv": NGPTScale(1.0, math.sqrt(d)),
        "ngpt_sz": NGPTScale(qz, 1.0 / qz),
    }


def init_law(spec: ModelSpec, p: ParamInfo) -> tuple[float, float]:
    """The spec's initialisation of `p` as (mean, std): N(mean, std^2), or the constant `mean` if std is 0.

    GPT-2: N(0, 0.02) for embeddings and weights, N(0, 0.02 / sqrt(2 n_layer)) for the weights that
    write into the residual stream, zero biases, unit norm gains, zero sink logits (= softmax1).
    nGPT: matrices N(0, 1/d) and then normalized (normalize_weights), scaling vectors at their
    stored init. Backends apply it with their own RNG; weights/synthetic.py with a seeded numpy one.
    """
    if p.role in ngpt_scales(spec):
        return ngpt_scales(spec)[p.role].init, 0.0
    if spec.architecture == "ngpt":
        return 0.0, spec.n_embd**-0.5
    if p.role in ("bias", "norm_bias", "attention_sink"):
        return 0.0, 0.0
    if p.role == "norm_gain":
        return 1.0, 0.0
    if p.role == "residual_linear":
        return 0.0, 0.02 / math.sqrt(2 * spec.n_layer)
    return 0.0, 0.02


gpt2_init = init_law  # the name the first backends were written against
