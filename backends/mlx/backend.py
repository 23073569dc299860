"""The MLX backend behind gptspec.backends.load("mlx", ...) and the conformance suite."""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...spec import OPTIONS, BackendError, ModelSpec, SpecError
from ...spec.checks import check_draws_array, check_dtype, check_state_shapes
from ..base import Backend, LossAndGrads
from . import blas
from .model import GPT, check_mx_targets
from .ngpt import NGPT

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resolve_device(device) -> mx.Device:
    """None -> MLX's default device; "cpu" | "gpu" (optionally ":N") -> mx.Device.
    "metal"/"mps" and "cuda" name the GPU too, when it is that kind."""
    if device is None:
        return mx.default_device()
    if isinstance(device, mx.Device):
        return resolve_device(_name(device))
    name, _, index = str(device).lower().partition(":")
    if name not in ("cpu", "gpu", "mps", "metal", "cuda") or (index and not index.isdigit()):
        raise BackendError(f"mlx backend runs on cpu or gpu, not {device!r}")
    kind = mx.gpu if name != "cpu" else mx.cpu
    gpu = "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else None
    if name in ("mps", "metal", "cuda") and {"mps": "metal"}.get(name, name) != gpu:
        raise BackendError(f"mlx cannot use device {device!r}: this mlx's GPU is {gpu or 'absent'}")
    if kind == mx.gpu and not mx.is_available(mx.gpu):
        raise BackendError(f"mlx cannot use device {device!r}: this mlx build has no GPU "
                           "(Linux: pip install 'mlx[cuda]'; macOS: plain mlx uses Metal)")
    count = mx.device_count(kind)
    if int(index or 0) >= count:
        raise BackendError(f"mlx cannot use device {device!r}: only {count} {name} device(s)")
    return mx.Device(kind, int(index or 0))


def _name(dev: mx.Device) -> str:
    return "gpu" if dev.type == mx.gpu else "cpu"


@lru_cache(maxsize=None)
def _tf32_matmuls(dev: mx.Device) -> bool:
    """Whether float32 matmuls on `dev` round their inputs to TF32's 10-bit mantissa.

    MLX reads MLX_ENABLE_TF32 once, at its first float32 GEMM, so the only proof is to look: a
    GEMM (a GEMV may stay exact) whose every output is 1 + 2^-20 times 1, which TF32 rounds to 1.
    """
    x = 1 + 2.0 ** -20
    with mx.stream(dev):
        out = (x * mx.eye(64) @ mx.ones((64, 64)))[0, 0].item()
    return out != x


def _require_ieee_float32(model: GPT | NGPT) -> None:
    if model.wte.weight.dtype == mx.float32 and _tf32_matmuls(model.device):
        raise BackendError(
            "MLX runs float32 matmuls in reduced precision (TF32) in this process, but the spec's "
            "float32 is IEEE: set MLX_ENABLE_TF32=0 before the first MLX matmul (MLX reads it once)"
        )


class MLXBackend(Backend):
    name = "mlx"
    extra = "gptspec[mlx]"
    implements = OPTIONS

    def version(self) -> str:
        return f"mlx {mx.__version__} ({blas.ensure_loaded()})"

    def devices(self) -> list[str]:
        default = _name(mx.default_device())
        others = ["gpu"] if mx.is_available(mx.gpu) else []
        return [default] + [d for d in ["cpu"] + others if d != default]

    def dtypes(self, device: str) -> tuple[str, ...]:
        resolve_device(device)
        return tuple(_DTYPES)

    def build(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
              device=None) -> GPT | NGPT:
        self.check_supported(spec)
        dev = resolve_device(device)
        dtype = check_dtype(dtype, self.dtypes(_name(dev)), f"mlx on {_name(dev)}")
        check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "weights for mlx")
        model = (NGPT if spec.architecture == "ngpt" else GPT)(spec, dev)  # lazy: the init is only replaced
        # mx.array copies, so the model never aliases the caller's arrays (normalize() replaces its own).
        # astype rounds to nearest, ties to even, as SPEC.md section 7 asks (a test holds it to that).
        model.load_weights([(n, mx.array(np.asarray(a)).astype(_DTYPES[dtype])) for n, a in params.items()])
        mx.eval(model.parameters())
        return model.eval()

    def normalize(self, model) -> None:
        if isinstance(model, NGPT):  # GPT-2 has no unit-norm weights: nothing to do
            model.normalize_()
            mx.eval(model.parameters())

    def state(self, model) -> dict[str, np.ndarray]:
        return {n: _numpy(p) for n, p in tree_flatten(model.parameters())}

    def forward(self, model, tokens: np.ndarray) -> np.ndarray:
        _require_ieee_float32(model)
        with mx.stream(model.device):
            return _numpy(model(mx.array(np.asarray(tokens))))

    def extend(self, model, tokens: np.ndarray, cache, last_only: bool = False):
        _require_ieee_float32(model)
        cache = model.make_cache() if cache is None else cache
        with mx.stream(model.device):
            logits = model(mx.array(np.asarray(tokens)), cache=cache, last_only=last_only)
            mx.eval(logits, [(c.keys, c.values) for c in cache])  # the cache too: no graph kept between steps
            return _numpy(logits), cache

    def loss_and_grads(self, model, tokens: np.ndarray, targets: np.ndarray,
                       draws: np.ndarray | None = None) -> LossAndGrads:
        _require_ieee_float32(model)
        check_draws_array(model.spec, np.shape(tokens), draws)
        tokens, targets = mx.array(np.asarray(tokens)), mx.array(np.asarray(targets))
        check_mx_targets(model.spec, tokens, targets)
        draws = None if draws is None else mx.array(np.asarray(draws, np.float32))  # decisions only: float32 will do
        with mx.stream(model.device):
            (loss, logits), grads = nn.value_and_grad(model, model.loss_and_logits)(tokens, targets, draws)
            grads = tree_flatten(grads)
            mx.eval(loss, logits, grads)
            return LossAndGrads(loss.item(), _numpy(logits), {n: _numpy(g) for n, g in grads})

    def residual_stats(self, model, tokens: np.ndarray) -> dict[str, np.ndarray]:
        if not isinstance(model, GPT):  # as the reference has it
            raise SpecError(f"residual_stats are defined for architecture='gpt2' (SPEC.md 18.4), "
                            f"not {model.spec.architecture!r}")
        stats = model.residual_stats(mx.array(np.asarray(tokens)))
        mx.eval(stats)
        return {name: np.array(a).astype(np.float64) for name, a in stats.items()}


def _numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))  # numpy has no bfloat16
