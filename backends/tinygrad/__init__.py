"""The tinygrad backend: GPT-2 (model.py) and nGPT (ngpt.py) in plain tinygrad, and their conformance adapter (backend.py)."""
from .backend import TinygradBackend, tinygrad_device
from .losses import cross_entropy
from .model import GPT, KVCache
from .ngpt import NGPT

BACKEND = TinygradBackend()

__all__ = ["GPT", "NGPT", "KVCache", "cross_entropy", "TinygradBackend", "tinygrad_device", "BACKEND"]
