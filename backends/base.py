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

from ..spec import ModelSpec
from ..weights import Checkpoint, load_checkpoint


@dataclass
class LossAndGrads:
    loss: float
    logits: np.ndarray            # (B, T, vocab) float32
    grads: dict[str, np.ndarray]  # canonical name -> float32, canonical layout


class Backend(ABC):
    name: str          # registry name, e.g. "torch"
    extra: str         # pip extra that installs it, e.g. "gptspec[torch]"

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
    def loss_and_grads(self, model: Any, tokens: np.ndarray, targets: np.ndarray) -> LossAndGrads:
        """Mean cross-entropy (SPEC.md), logits and every parameter's gradient."""

    def load(self, source, dtype: str | None = None, device: str | None = None) -> Any:
        """The native model for a name, path or Checkpoint (see gptspec.weights.load_checkpoint)."""
        ckpt: Checkpoint = load_checkpoint(source)
        model = self.build(ckpt.spec, ckpt.params, dtype or "float32", device)
        return model
