"""The backend protocol: what the conformance suite (and `load`) asks of a framework.

A backend builds its framework's native model from a ModelSpec and canonical numpy
parameters, and answers three questions about it in numpy: the logits, and the loss
with the gradient of every parameter keyed by canonical name in canonical layout.
Everything else (input checks, weight reading, comparison) is shared and lives in
spec/, weights/ and conformance/.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..spec import OPTIONS, BackendError, ModelSpec
from ..weights import Checkpoint, load_checkpoint

GPT2_ONLY: dict[str, tuple[str, ...]] = {name: values[:1] for name, values in OPTIONS.items()}


@dataclass
class LossAndGrads:
    loss: float
    logits: np.ndarray            # (B, T, vocab) float32
    grads: dict[str, np.ndarray]  # canonical name -> float32, canonical layout


class Backend(ABC):
    name: str          # registry name, e.g. "torch"
    extra: str         # pip extra that installs it, e.g. "gptspec[torch]"
    #: The option values (spec/config.py OPTIONS) this backend implements. A spec outside them is
    #: "not implemented" here: a visible gap in the conformance table, a clear error from load().
    implements: Mapping[str, tuple[str, ...]] = GPT2_ONLY

    def unsupported(self, spec: ModelSpec) -> str | None:
        """None if this backend implements every option of `spec`, else which one it lacks."""
        for name, values in self.implements.items():
            if getattr(spec, name) not in values:
                return f"{self.name} does not implement {name}={getattr(spec, name)!r}"
        return None

    def check_supported(self, spec: ModelSpec) -> None:
        reason = self.unsupported(spec)
        if reason:
            raise BackendError(reason)

    def version(self) -> str:
        """The framework and its version, e.g. 'torch 2.13.0'."""
        return self.name

    def unavailable_reason(self) -> str | None:
        """None when usable here; otherwise what is missing and how to install it."""
        return None

    @abstractmethod
    def devices(self) -> list[str]:
        """The devices usable on this machine, default first (e.g. ["cpu", "cuda"])."""

    @abstractmethod
    def dtypes(self, device: str) -> tuple[str, ...]:
        """The spec dtypes this backend runs on `device`."""

    @abstractmethod
    def build(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
              device: str | None = None) -> Any:
        """The native model with `params` (canonical names/layout) cast to `dtype` on `device`."""

    @abstractmethod
    def forward(self, model: Any, tokens: np.ndarray) -> np.ndarray:
        """Logits as float32 numpy for (B, T) integer tokens."""

    @abstractmethod
    def loss_and_grads(self, model: Any, tokens: np.ndarray, targets: np.ndarray,
                       draws: np.ndarray | None = None) -> LossAndGrads:
        """The spec's loss (SPEC.md 4 and 18), the last layer's logits and every parameter's gradient.
        `draws`: the (n_layer, B, T) uniforms of loss="early_exit" (spec.checks.check_draws), else None."""

    def residual_stats(self, model: Any, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """SPEC.md 18.4 ("SIZE COMPARISON"): {"input", "mid", "output", "normed"} -> (n_layer,) float64."""
        raise BackendError(f"{self.name} does not implement the residual-stream statistics")

    def normalize(self, model: Any) -> None:
        """SPEC.md 11.3: the post-step weight normalization, in place (a no-op without unit-norm weights)."""
        raise BackendError(f"{self.name} does not implement the weight normalization")

    def state(self, model: Any) -> dict[str, np.ndarray]:
        """The model's current weights, canonical names and layouts, as float32 numpy."""
        raise BackendError(f"{self.name} does not implement reading its weights back")

    def extend(self, model: Any, tokens: np.ndarray, cache: Any, last_only: bool = False) -> tuple[np.ndarray, Any]:
        """SPEC.md 12: logits (B, t, vocab) float32 of `tokens` (B, t) at the positions after those in
        `cache` (None: empty), and the grown cache; `last_only` returns the last position's only (B, 1, vocab)."""
        raise BackendError(f"{self.name} does not implement generation (a KV cache)")

    def load(self, source, dtype: str | None = None, device: str | None = None) -> Any:
        """The native model for a name, path or Checkpoint (see gptspec.weights.load_checkpoint)."""
        ckpt: Checkpoint = load_checkpoint(source)
        self.check_supported(ckpt.spec)
        model = self.build(ckpt.spec, ckpt.params, dtype or "float32", device)
        return model
