"""gptspec: GPT-2 specified once, run in PyTorch, MLX and tinygrad, proven to agree.

Importing gptspec imports no framework; backends load on demand through
gptspec.backends.
"""
__version__ = "0.1.0"

from .spec import ModelSpec  # noqa: E402

__all__ = ["ModelSpec", "__version__"]
