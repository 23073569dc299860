"""The torch backend behind gptspec.backends.load("torch", ...) and the conformance suite."""
from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import torch

from ...spec import OPTIONS, BackendError, ModelSpec
from ...spec.checks import check_draws_array, check_dtype, check_state_shapes
from ..base import Backend, LossAndGrads
from .model import GPT, check_targets_tensor, cross_entropy
from .ngpt import NGPT


def model_class(spec: ModelSpec):
    return NGPT if spec.architecture == "ngpt" else GPT

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device) -> torch.device:
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"torch cannot use device {str(dev)!r}: torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendError(f"torch cannot use device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError("torch cannot use device 'mps': torch.backends.mps.is_available() is False")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BackendError(f"torch backend runs on cpu, cuda or mps, not {str(dev)!r}")
    return dev


@contextlib.contextmanager
def ieee_float32():
    """Full-precision float32 matmuls (no TF32) for the duration of a conformance call."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class TorchBackend(Backend):
    name = "torch"
    extra = "gptspec[torch]"
    implements = OPTIONS

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def devices(self) -> list[str]:
        out = ["cpu"]
        if torch.cuda.is_available():
            out.insert(0, "cuda")
        if torch.backends.mps.is_available():
            out.insert(0, "mps")
        return out

    def dtypes(self, device: str) -> tuple[str, ...]:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            return ("float32", "float16")
        return ("float32", "bfloat16", "float16")

    def build(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
              device=None) -> torch.nn.Module:
        self.check_supported(spec)
        dev = resolve_device(device)
        dtype = check_dtype(dtype, self.dtypes(str(dev)), f"torch on {dev}")
        check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "weights for torch")
        with torch.device("meta"):
            model = model_class(spec)(spec)  # no memory, no init: every tensor is replaced below
        # torch.tensor copies: the model must never alias (and normalize_ never write into) the caller's arrays
        state = {n: torch.tensor(np.asarray(a), dtype=_DTYPES[dtype], device=dev) for n, a in params.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def normalize(self, model) -> None:
        if hasattr(model, "normalize_"):
            model.normalize_()

    def state(self, model) -> dict[str, np.ndarray]:
        return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}

    def _tensor(self, model, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(model.wte.weight.device)

    def forward(self, model, tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad(), ieee_float32():
            logits = model(self._tensor(model, tokens))
        return logits.float().cpu().numpy()

    def extend(self, model, tokens: np.ndarray, cache, last_only: bool = False):
        cache = model.make_cache() if cache is None else cache
        with torch.no_grad(), ieee_float32():
            logits = model(self._tensor(model, tokens), cache=cache, last_only=last_only)
        return logits.float().cpu().numpy(), cache

    def loss_and_grads(self, model, tokens: np.ndarray, targets: np.ndarray, draws=None) -> LossAndGrads:
        tokens_t, targets_t = self._tensor(model, tokens), self._tensor(model, targets)
        check_targets_tensor(model.spec, tokens_t, targets_t)
        check_draws_array(model.spec, tokens_t.shape, draws)
        model.zero_grad(set_to_none=True)
        with ieee_float32():
            if model.spec.architecture == "ngpt":
                logits = model(tokens_t)
                loss = cross_entropy(logits, targets_t)
            else:
                draws_t = None if draws is None else self._tensor(model, np.asarray(draws, np.float32))
                loss, logits = model.loss_and_logits(tokens_t, targets_t, draws_t)
            loss.backward()
        grads = {n: p.grad.float().cpu().numpy() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return LossAndGrads(float(loss.detach()), logits.detach().float().cpu().numpy(), grads)

    def residual_stats(self, model, tokens: np.ndarray) -> dict[str, np.ndarray]:
        if model.spec.architecture != "gpt2":
            raise BackendError("residual_stats are defined for architecture='gpt2' (SPEC.md 18.4)")
        with ieee_float32():
            stats = model.residual_stats(self._tensor(model, tokens))
        return {k: v.double().cpu().numpy() for k, v in stats.items()}
