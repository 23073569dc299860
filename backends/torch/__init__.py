"""The PyTorch backend: GPT-2 (model.py) and nGPT (ngpt.py) as nn.Modules, and the adapter (backend.py)."""
from .backend import TorchBackend, model_class
from .model import GPT, cross_entropy
from .ngpt import NGPT

BACKEND = TorchBackend()

__all__ = ["GPT", "NGPT", "model_class", "cross_entropy", "TorchBackend", "BACKEND"]
