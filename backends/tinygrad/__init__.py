"""The tinygrad backend: GPT-2 (model.py) and nGPT (ngpt.py) in plain tinygrad, attention and the KV cache
(attention.py), the losses (losses.py), and the adapter (backend.py)."""
from .attention import KVCache
from .backend import TinygradBackend, tinygrad_device
from .losses import cross_entropy
from .model import GPT
from .ngpt import NGPT

BACKEND = TinygradBackend()

__all__ = ["GPT", "NGPT", "KVCache", "cross_entropy", "TinygradBackend", "tinygrad_device", "BACKEND"]
