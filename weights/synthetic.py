"""Deterministic synthetic weights for any ModelSpec.

Two initialisations (SPEC.md, "Synthetic weights"):
- "gpt2": GPT-2's own init: N(0, 0.02); residual projections N(0, 0.02/sqrt(2 n_layer));
  zero biases; unit LayerNorm gains. What a training run starts from.
- "conformance": every tensor random and activations of realistic size (unit-variance
  pre-activations, non-zero biases and norm parameters), so that a wrong GELU form, a
  dropped bias or a swapped norm parameter changes the output measurably. GPT-2's init
  would hide those: its GELU inputs are ~0.1 wide, where the tanh and erf forms agree.

Each tensor draws from its own stream, seeded by (seed, name), so a tensor's values do
not depend on the order of generation or on the other tensors of the model.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from ..spec import ModelSpec, WeightsError, param_table
from ..spec.params import ParamInfo, init_law, ngpt_scales

INITS = ("gpt2", "conformance")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _gpt2(spec: ModelSpec, p: ParamInfo, rng) -> np.ndarray:
    mean, std = init_law(spec, p)
    if std == 0:
        return np.full(p.shape, mean, np.float32)
    return rng.standard_normal(p.shape, dtype=np.float32) * np.float32(std) + np.float32(mean)


def _conformance(spec: ModelSpec, p: ParamInfo, rng) -> np.ndarray:
    z = rng.standard_normal(p.shape, dtype=np.float32)
    if p.role in ngpt_scales(spec):
        init = np.float32(ngpt_scales(spec)[p.role].init)
        # alphas of both signs, so that |alpha| and alpha differ; other scales near their init
        return init * z if p.role == "ngpt_alpha" else init * (1 + np.float32(0.2) * z)
    if p.unit_norm_axis is not None:
        return z  # normalized afterwards
    if p.role in ("token_embedding", "position_embedding"):
        return z * np.float32(2.0 / math.sqrt(spec.n_embd))  # logits ~ N(0, 4)
    if p.role in ("linear", "residual_linear"):
        return z / np.float32(math.sqrt(p.shape[1]))  # unit-variance outputs
    if p.role == "norm_gain":
        return 1 + np.float32(0.2) * z
    if p.role == "attention_sink":
        return z  # sink logits comparable to the attention scores
    return np.float32(0.2) * z  # biases, norm biases


def synthetic_params(spec: ModelSpec, seed: int = 0, init: str = "gpt2") -> dict[str, np.ndarray]:
    """Canonical float32 parameters, identical for the same (spec, seed, init) on any machine."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        # numpy's SeedSequence takes non-negative integers only
        raise WeightsError(f"the synthetic seed must be a non-negative integer, got {seed!r}")
    try:
        make = {"gpt2": _gpt2, "conformance": _conformance}[init]
    except KeyError:
        raise ValueError(f"unknown synthetic init {init!r}; choose one of {INITS}") from None
    params = {p.name: make(spec, p, _rng(seed, p.name)) for p in param_table(spec)}
    return _normalized(spec, params)


def _normalized(spec: ModelSpec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """nGPT starts from unit-norm matrices (SPEC.md 11.3), normalized in float32 like the backends."""
    for p in param_table(spec):
        if p.unit_norm_axis is not None:
            w = params[p.name]
            params[p.name] = w / np.sqrt((w * w).sum(axis=p.unit_norm_axis, keepdims=True))
    return params


def write_synthetic(directory, spec: ModelSpec, seed: int = 0, init: str = "gpt2", dtype: str = "float32"):
    """A synthetic checkpoint in the Hugging Face layout (config.json + model.safetensors), marked synthetic."""
    from .hf import write_hf

    return write_hf(directory, spec, synthetic_params(spec, seed, init), dtype, synthetic=True)
