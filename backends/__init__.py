"""The backend registry.

    from gptspec.backends import load, available
    model = load("torch", "gpt2", device="cuda", dtype="bfloat16")   # a torch.nn.Module

Backends are imported only when asked for, so importing gptspec imports no framework.
A backend plugs in with one line in _REGISTRY and a package backends/<name>/ whose
__init__ exposes `BACKEND`, an instance of backends.base.Backend.
"""
from __future__ import annotations

import importlib
import importlib.util

from ..spec import BackendError
from .base import Backend, LossAndGrads

# name -> (backend package, framework module whose presence it needs)
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("gptspec.backends.torch", "torch"),
    "mlx": ("gptspec.backends.mlx", "mlx"),
    "tinygrad": ("gptspec.backends.tinygrad", "tinygrad"),
}


def names() -> list[str]:
    """Every backend gptspec knows, installed or not."""
    return list(_REGISTRY)


def get(name: str) -> Backend:
    """The Backend object for `name`; a clear error if unknown or not installed here."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; gptspec has {', '.join(_REGISTRY)}")
    module, framework = _REGISTRY[name]
    if importlib.util.find_spec(framework) is None:
        raise BackendError(
            f"backend {name!r} needs the {framework!r} package: pip install 'gptspec[{name}]'"
        )
    try:
        backend = importlib.import_module(module).BACKEND
    except (ImportError, AttributeError) as e:
        if importlib.util.find_spec(module) is None or isinstance(e, AttributeError):
            raise BackendError(f"backend {name!r} is not implemented in this gptspec") from None
        raise
    reason = backend.unavailable_reason()
    if reason:
        raise BackendError(f"backend {name!r} is installed but cannot run here: {reason}")
    return backend


def status() -> dict[str, str | None]:
    """name -> None when usable, else why not."""
    out = {}
    for name in _REGISTRY:
        try:
            get(name)
            out[name] = None
        except BackendError as e:
            out[name] = str(e)
    return out


def available() -> list[str]:
    """The backends installed and usable on this machine."""
    return [name for name, why in status().items() if why is None]


def load(backend: str, name_or_path, *, dtype=None, device=None):
    """Load weights (a model name, a path or a Checkpoint) into `backend`'s native model."""
    return get(backend).load(name_or_path, dtype=dtype, device=device)


__all__ = ["load", "available", "get", "names", "status", "Backend", "LossAndGrads"]
