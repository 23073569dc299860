"""The PyTorch backend: GPT-2 as an nn.Module (model.py) and its conformance adapter (backend.py)."""
from .backend import TorchBackend
from .model import GPT, cross_entropy

BACKEND = TorchBackend()

__all__ = ["GPT", "cross_entropy", "TorchBackend", "BACKEND"]
