"""The weight format: canonical safetensors files, Hugging Face, nanoGPT and llm.c import/export,
name resolution, synthetic checkpoints and the offline tokenizer."""
from .format import Checkpoint, MappedTensors, read, round_to_dtype, save
from .hf import read_hf, write_hf
from .llmc import read_llmc, write_llmc
from .nanogpt import read_nanogpt, write_nanogpt
from .resolve import ENV_VAR, load_checkpoint
from .synthetic import INITS, synthetic_params, write_synthetic

__all__ = [
    "Checkpoint", "MappedTensors", "load_checkpoint", "read", "save", "read_hf", "write_hf", "read_nanogpt", "write_nanogpt",
    "read_llmc", "write_llmc",
    "synthetic_params", "write_synthetic", "round_to_dtype", "INITS", "ENV_VAR",
]
