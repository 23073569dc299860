"""gptspec: GPT-2 specified once, run in PyTorch, MLX and tinygrad, proven to agree.

Importing gptspec imports no framework; backends load on demand through
gptspec.backends.
"""
__version__ = "0.1.0"

# Absolute, not relative: the repository root is this package, and pytest, collecting tests/
# below it, imports this file on its own (as "__init__", with no parent package) whenever the
# clone's folder name is not a valid package name (a CI checkout such as tmp.Xy12).
from gptspec.spec import ModelSpec  # noqa: E402

__all__ = ["ModelSpec", "__version__"]
