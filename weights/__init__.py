"""The weight format: canonical safetensors files, Hugging Face import/export,
name resolution, synthetic checkpoints and the offline tokenizer."""
from .format import Checkpoint, read, round_to_dtype, save
from .hf import read_hf, write_hf
from .resolve import ENV_VAR, load_checkpoint
from .synthetic import INITS, synthetic_params, write_synthetic

__all__ = [
    "Checkpoint", "load_checkpoint", "read", "save", "read_hf", "write_hf",
    "synthetic_params", "write_synthetic", "round_to_dtype", "INITS", "ENV_VAR",
]
