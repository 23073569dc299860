"""The PyTorch backend: GPT-2 (model.py) and nGPT (ngpt.py) as nn.Modules, attention and the KV cache
(attention.py), the losses (losses.py), and the adapter (backend.py)."""
from .backend import TorchBackend
from .losses import cross_entropy
from .model import GPT
from .ngpt import NGPT

BACKEND = TorchBackend()

__all__ = ["GPT", "NGPT", "cross_entropy", "TorchBackend", "BACKEND"]
