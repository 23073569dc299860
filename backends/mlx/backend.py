"""The MLX backend behind gptspec.backends.load("mlx", ...) and the conformance suite."""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...spec import BackendError, param_table
from ...spec.reference.training import TrainState
from ...weights.format import MappedTensors
from ..base import Backend, LossAndGrads, StepStats
from . import blas, train
from .model import GPT
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


def _from_files(params: Mapping[str, np.ndarray], dtype: mx.Dtype, dev: mx.Device) -> list | None:
    """The parameters of a file gptspec has read and checked (weights/format.py MappedTensors), taken from
    MLX's own lazy loader, mx.load, of that very file (its descriptor: a file renamed over the path since is
    not read), cast lazily: as with mlx-lm's lazy load, the bytes are read on the first evaluation, into
    arrays MLX owns (the model never aliases the file). A Hugging Face Conv1D weight, stored (in, out), stays
    MLX's transposed view of it on the CPU, where matmul reads either layout bit for bit alike
    (tests/test_loading.py, decoding included) without the strided transposing copy that took half of a
    gpt2 load; elsewhere (a GPU) it is made contiguous. None where the file cannot be reopened so."""
    if not isinstance(params, MappedTensors):
        return None
    files, weights = {}, []
    for name in params:
        where = params.in_file(name)
        if where is None:
            return None
        if where.path not in files:
            files[where.path] = mx.load(where.path, format="safetensors")
        array = files[where.path][where.key].astype(dtype)
        if where.transposed:
            array = array.T if dev.type == mx.cpu else mx.contiguous(array.T)
        weights.append((name, array))
    return weights


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
    models = {"gpt2": GPT, "ngpt": NGPT}
    implements = {
        "architecture": ("gpt2", "ngpt"),
        "activation": ("gelu_tanh",),
        "norm": ("layernorm", "layernorm_noaffine", "rmsnorm"),
        "bias": ("on", "off"),
        "attention": ("softmax", "softmax1", "softmax_c", "learned_sinks"),
        "positions": ("learned", "rope", "none"),
        "mlp": ("gelu", "swiglu"),
        "ngpt_alpha": ("abs", "signed"),
        "ngpt_scale": ("inv_sqrt_d", "inv_d"),
        "blocks": ("independent", "shared"),
        "block_form": ("sequential", "parallel", "multiplicative", "normed_residual", "escape_normed",
                       "escape_residual"),
        "attention_values": ("projected", "identity"),
        "head_reduce": ("mean", "sum"),
        "loss": ("final", "all_layers", "all_layers_local", "early_exit"),
    }

    def version(self) -> str:
        return f"mlx {mx.__version__} ({blas.ensure_loaded()})"

    def devices(self) -> list[str]:
        default = _name(mx.default_device())
        others = ["gpu"] if mx.is_available(mx.gpu) else []
        return [default] + [d for d in ["cpu"] + others if d != default]

    def dtypes(self, device: str) -> tuple[str, ...]:
        resolve_device(device)
        return tuple(_DTYPES)

    def _device(self, device) -> mx.Device:
        return resolve_device(device)

    def _device_name(self, dev: mx.Device) -> str:
        return _name(dev)

    def _new_model(self, spec, dev: mx.Device):
        return self.model_class(spec)(spec, dev)  # lazy: the init is only replaced

    def _parameter_names(self, model) -> list[str]:
        return [n for n, _ in tree_flatten(model.parameters())]

    def _assign(self, model, params: Mapping[str, np.ndarray], dtype: str, dev: mx.Device):
        # astype rounds to nearest, ties to even, as SPEC.md section 7 asks (a test holds it to that).
        weights = _from_files(params, _DTYPES[dtype], dev)
        if weights is not None:  # read on first use, as mx.load does
            model.load_weights(weights)
            return model.eval()
        # mx.array copies, so the model never aliases the caller's arrays (normalize() replaces its own).
        # One tensor at a time, evaluated before the next: a float32 source cast to bfloat16 is freed at once.
        weights = []
        for name in params:
            weights.append((name, mx.array(np.asarray(params[name])).astype(_DTYPES[dtype])))
            mx.eval(weights[-1][1])
        model.load_weights(weights)
        mx.eval(model.parameters())
        return model.eval()

    def _normalize(self, model) -> None:
        model.normalize_()
        mx.eval(model.parameters())

    def state(self, model) -> dict[str, np.ndarray]:
        return {n: _numpy(p) for n, p in tree_flatten(model.parameters())}

    def _forward(self, model, tokens: np.ndarray) -> np.ndarray:
        _require_ieee_float32(model)
        with mx.stream(model.device):
            return _numpy(model(mx.array(tokens)))

    def _extend(self, model, tokens: np.ndarray, cache, last_only: bool = False):
        _require_ieee_float32(model)
        cache = model.make_cache() if cache is None else cache
        with mx.stream(model.device):
            logits = model(mx.array(tokens), cache=cache, last_only=last_only)
            mx.eval(logits, [(c.keys, c.values) for c in cache])  # the cache too: no graph kept between steps
            return _numpy(logits), cache

    def _loss_and_grads(self, model, tokens: np.ndarray, targets: np.ndarray, draws) -> LossAndGrads:
        _require_ieee_float32(model)
        tokens, targets = mx.array(tokens), mx.array(targets)
        draws = None if draws is None else mx.array(draws.astype(np.float32))  # decisions only: float32 will do
        with mx.stream(model.device):
            (loss, logits), grads = nn.value_and_grad(model, model.loss_and_logits)(tokens, targets, draws)
            grads = tree_flatten(grads)
            mx.eval(loss, logits, grads)
            return LossAndGrads(loss.item(), _numpy(logits), {n: _numpy(g) for n, g in grads})

    def _residual_stats(self, model, tokens: np.ndarray) -> dict[str, np.ndarray]:
        stats = model.residual_stats(mx.array(tokens))
        mx.eval(stats)
        return {name: np.array(a).astype(np.float64) for name, a in stats.items()}

    # -- training (SPEC.md 20): train.py is the loop an MLX user writes; these hooks adapt it --------
    def _optimizer(self, model, train_spec):
        return train.configure_optimizer(model, train_spec)

    def _train_step(self, model, optimizer, train_spec, it, micro_batches, draws) -> StepStats:
        _require_ieee_float32(model)
        return StepStats(*train.train_step(model, optimizer, train_spec, it, micro_batches, draws))

    def _optimizer_state(self, model, optimizer, dtype: np.dtype) -> TrainState:
        slots, step = _moment_slots(model, optimizer), _step_count(optimizer)
        params = dict(tree_flatten(model.parameters()))
        names = [info.name for info in param_table(model.spec)]
        return TrainState(step, *({n: np.array(group[n], dtype=dtype) for n in names}
                                  for group in (params, {n: s["m"] for n, s in slots.items()},
                                                {n: s["v"] for n, s in slots.items()})))

    def _load_optimizer_state(self, model, optimizer, state: TrainState) -> None:
        # MLX's state is a tree keyed like the parameters: replacing its arrays is loading it
        for name, slot in _moment_slots(model, optimizer).items():
            slot["m"] = mx.array(np.asarray(state.m[name], dtype=np.float32))
            slot["v"] = mx.array(np.asarray(state.v[name], dtype=np.float32))
        for group in _groups(optimizer):
            group.state["step"] = mx.array(int(state.step), mx.uint64)
        mx.eval(optimizer.state)


def _groups(optimizer) -> list:
    """The AdamW of each parameter group (a MultiOptimizer's parts, or the optimizer itself)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def _moment_slots(model, optimizer) -> dict[str, dict]:
    """canonical name -> the optimizer's {"m": ..., "v": ...} of that parameter, over every group.
    MLX creates them at the first update unless init() ran: an optimizer without any gets them now
    (zeros, step 0)."""
    found = {}
    for group in _groups(optimizer):
        _collect_slots(group.state, "", found)
    if not found:
        optimizer.init(model.trainable_parameters())
        return _moment_slots(model, optimizer)
    missing = [info.name for info in param_table(model.spec) if info.name not in found]
    if missing:
        raise BackendError(f"the MLX optimizer holds no moments for {', '.join(missing)}: "
                           "was it made for another model? (Backend.optimizer(model, train_spec))")
    return found


def _collect_slots(tree, prefix: str, found: dict) -> None:
    if isinstance(tree, dict) and isinstance(tree.get("m"), mx.array) and isinstance(tree.get("v"), mx.array):
        found[prefix] = tree
        return
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, child in children:
        _collect_slots(child, f"{prefix}.{key}" if prefix else str(key), found)


def _step_count(optimizer) -> int:
    steps = {int(group.state["step"].item()) for group in _groups(optimizer)}
    if len(steps) != 1:
        raise BackendError(f"the MLX optimizer's parameter groups disagree on the step count: {sorted(steps)}")
    return steps.pop()


def _numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))  # numpy has no bfloat16
