"""The MLX backend: GPT-2 (model.py) and nGPT (ngpt.py) as mlx.nn.Modules, attention and the KV cache
(attention.py), the losses (losses.py), and the adapter (backend.py).

Two process-wide settings must precede MLX's first use, so they happen here, on the backend's
first import: an optimised BLAS on Linux (blas.py), and full-precision float32 matmuls, which
SPEC.md section 7 requires and MLX reads once from MLX_ENABLE_TF32 (default 1: TF32 on CUDA
and on Apple chips with neural accelerators). An explicit MLX_ENABLE_TF32 is respected.
So import this package (or call gptspec.backends.get("mlx") / load("mlx", ...)) before `mlx.core`;
otherwise blas.py logs a warning that it came too late.
"""
import os

from . import blas

blas.ensure_loaded()
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from .backend import MLXBackend  # noqa: E402  (mlx.core is imported from here on)
from .losses import cross_entropy  # noqa: E402
from .model import GPT  # noqa: E402
from .ngpt import NGPT  # noqa: E402

BACKEND = MLXBackend()

__all__ = ["GPT", "NGPT", "cross_entropy", "MLXBackend", "BACKEND"]
