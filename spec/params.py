"""The canonical parameter table: every parameter's name, shape and role.

It is derived from a ModelSpec and is the single source of truth for the
reference, every backend, the weight files and the Hugging Face mapping.
Linear weights are stored (out_features, in_features): y = x @ W.T + b.
The LM head is tied to `wte.weight` and has no entry of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .config import ModelSpec

# Roles decide initialisation (weights/synthetic.py) and, later, weight decay.
ROLES = (
    "token_embedding",   # wte: input embedding and tied LM head
    "position_embedding",
    "linear",            # a weight read from the residual stream
    "residual_linear",   # a weight writing into the residual stream (GPT-2's scaled init)
    "bias",
    "norm_gain",
    "norm_bias",
)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    role: str
    # Hugging Face GPT-2 stores this weight as a Conv1D, i.e. transposed (in, out).
    hf_transposed: bool = False


@lru_cache(maxsize=64)
def _table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    C, V, P = spec.n_embd, spec.vocab_size, spec.n_positions
    rows = [
        ParamInfo("wte.weight", (V, C), "token_embedding"),
        ParamInfo("wpe.weight", (P, C), "position_embedding"),
    ]

    def linear(prefix, n_out, n_in, role):
        rows.append(ParamInfo(f"{prefix}.weight", (n_out, n_in), role, hf_transposed=True))
        rows.append(ParamInfo(f"{prefix}.bias", (n_out,), "bias"))

    def norm(prefix):
        rows.append(ParamInfo(f"{prefix}.weight", (C,), "norm_gain"))
        rows.append(ParamInfo(f"{prefix}.bias", (C,), "norm_bias"))

    for i in range(spec.n_layer):
        h = f"h.{i}"
        norm(f"{h}.ln_1")
        linear(f"{h}.attn.c_attn", 3 * C, C, "linear")
        linear(f"{h}.attn.c_proj", C, C, "residual_linear")
        norm(f"{h}.ln_2")
        linear(f"{h}.mlp.c_fc", 4 * C, C, "linear")
        linear(f"{h}.mlp.c_proj", C, 4 * C, "residual_linear")
    norm("ln_f")
    return tuple(rows)


def param_table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    """The parameters of `spec`, in canonical order."""
    return _table(spec)


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in _table(spec)}


def gpt2_init(spec: ModelSpec, p: ParamInfo) -> tuple[float, float]:
    """GPT-2's initialisation of `p` as (mean, std): N(mean, std^2), or the constant `mean` if std is 0.

    N(0, 0.02) for embeddings and weights, N(0, 0.02 / sqrt(2 n_layer)) for the weights that write
    into the residual stream, zero biases, unit norm gains. Backends apply it with their own RNG;
    weights/synthetic.py applies it with a seeded numpy one.
    """
    if p.role in ("bias", "norm_bias"):
        return 0.0, 0.0
    if p.role == "norm_gain":
        return 1.0, 0.0
    if p.role == "residual_linear":
        return 0.0, 0.02 / math.sqrt(2 * spec.n_layer)
    return 0.0, 0.02
