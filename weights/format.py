"""The canonical weight file: safetensors with canonical names, shapes and a self-description.

A canonical file holds exactly the tensors of the spec's parameter table (the tied LM head
is not stored: it is `wte.weight`), all in one dtype (float32, float16 or bfloat16), and
its `__metadata__` says what it is:

    model_spec    ModelSpec JSON (decides the architecture)   spec_version  SPEC_VERSION of the writer
    variant       the variant's name, for people             synthetic     "true" | "false"
    origin        where the weights came from

Files are written to a temporary name and renamed into place, so a failed write never
leaves a half-written file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError, safe_open

from ..spec import SPEC_VERSION, ModelSpec, SpecError, WeightsError, canonical_dtype, param_table
from ..spec.checks import check_state_shapes
from .atomic import atomic_write

STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class Checkpoint:
    """A model's spec and weights in canonical names and layouts.

    `params` are numpy float32 (float16 for float16 files; bfloat16 files are widened to
    float32, which is exact) and `stored_dtype` says what the file held.
    """

    spec: ModelSpec
    params: dict[str, np.ndarray]
    stored_dtype: str = "float32"
    source: str = "memory"
    synthetic: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        kind = "SYNTHETIC weights" if self.synthetic else "weights"
        return f"{kind} from {self.source} ({self.stored_dtype}, {self.spec.n_params:,} parameters)"


def fingerprint(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> str:
    """'sha256:<hex>' of the canonical weights: every tensor of the parameter table, in table order,
    as its name, numpy dtype, shape and little-endian bytes. The same weights give the same
    fingerprint on every machine; it covers the values only (compare the ModelSpec for the config)."""
    h = hashlib.sha256()
    for p in param_table(spec):
        a = np.asarray(params[p.name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{p.name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


# -- bfloat16 without a numpy bfloat16 dtype ---------------------------------------------
def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values that `x` takes once stored in `dtype` (float16 stays float16)."""
    dtype = canonical_dtype(dtype)
    if dtype == "bfloat16":
        return from_bfloat16_bits(to_bfloat16_bits(x))
    return np.asarray(x).astype(dtype)


# -- writing ---------------------------------------------------------------------------
def _encode(name: str, x: np.ndarray, dtype: str):
    """The contiguous little-endian buffer of `x` stored as `dtype` (bfloat16 as uint16 bits)."""
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise WeightsError(f"tensor {name!r} holds NaN or Inf; refusing to write it")
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype="<f4")
    if dtype == "float16":
        if np.abs(x).max(initial=0) > np.finfo(np.float16).max:
            raise WeightsError(
                f"tensor {name!r} holds values up to {np.abs(x).max():.4g}, beyond float16's range"
            )
        return np.ascontiguousarray(x, dtype="<f2")
    return to_bfloat16_bits(x).astype("<u2")


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], dtype: str, metadata: Mapping[str, str]
) -> Path:
    """Write `tensors` in `dtype` to `path` atomically (weights/atomic.py)."""
    from safetensors import TensorSpec, serialize_file

    dtype = canonical_dtype(dtype)
    path = Path(path)
    encoded = {name: _encode(name, x, dtype) for name, x in tensors.items()}
    # safetensors >= 0.8 takes raw buffers, which is how bfloat16 gets written without a numpy dtype
    specs = {
        name: TensorSpec(dtype=dtype, shape=list(buf.shape), data_ptr=buf.ctypes.data, data_len=buf.nbytes)
        for name, buf in encoded.items()
    }
    with atomic_write(path) as tmp:
        serialize_file(specs, str(tmp), metadata=dict(metadata))
    return path


def save(
    path: str | os.PathLike, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
    *, synthetic: bool = False, origin: str = "",
) -> Path:
    """Write a canonical gptspec file."""
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "parameters to save")
    from ..spec.variants import variant_name

    metadata = {
        "model_spec": spec.to_json(),
        "variant": variant_name(spec),  # informational: model_spec alone decides the architecture
        "spec_version": SPEC_VERSION,
        "synthetic": "true" if synthetic else "false",
        "origin": origin,
    }
    return write_safetensors(path, params, dtype, metadata)


# -- reading ---------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """All tensors of a safetensors file as numpy (bfloat16 widened), its metadata, and its dtype.

    Raises WeightsError naming the file for a missing, truncated or corrupt file, and for a
    tensor whose dtype is not a float type of the spec.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            codes = {n: f.get_slice(n).get_dtype() for n in names}
            bad = {n: c for n, c in codes.items() if c not in STORED_DTYPES}
            if bad:
                shown = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:5])
                raise WeightsError(
                    f"{path}: tensors must be F32, F16 or BF16; found {shown}"
                )
            tensors = {n: f.get_tensor(n) for n in names if codes[n] != "BF16"}
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if any(c == "BF16" for c in codes.values()):
        tensors.update(_read_bf16(path, [n for n in names if codes[n] == "BF16"]))
    dtypes = {STORED_DTYPES[c] for c in codes.values()}
    stored = dtypes.pop() if len(dtypes) == 1 else "mixed"
    return {n: tensors[n] for n in names}, metadata, stored


def _read_bf16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    # numpy has no bfloat16: read the raw bits at the offsets the (already validated) header gives.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start = 8 + n
        out = {}
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            bits = np.frombuffer(f.read(end - begin), dtype="<u2").reshape(info["shape"])
            out[name] = from_bfloat16_bits(bits)
    return out


def is_canonical(metadata: Mapping[str, str]) -> bool:
    return "model_spec" in metadata


def read(path: str | os.PathLike) -> Checkpoint:
    """Read a canonical gptspec file, checking it against its own spec."""
    path = Path(path)
    tensors, metadata, stored = read_safetensors(path)
    if not is_canonical(metadata):
        raise WeightsError(
            f"{path}: no 'model_spec' in the safetensors metadata, so it is not a gptspec file "
            "(a Hugging Face checkpoint is read with its config.json: pass its directory)"
        )
    version = metadata.get("spec_version", "?")
    if version != SPEC_VERSION:
        raise WeightsError(
            f"{path}: written for spec version {version}, this gptspec implements {SPEC_VERSION}"
        )
    try:
        spec = ModelSpec.from_json(metadata["model_spec"])
    except SpecError as e:
        raise WeightsError(f"{path}: its model_spec metadata is invalid: {e}") from None
    check_state_shapes(spec, {n: a.shape for n, a in tensors.items()}, str(path))
    return Checkpoint(
        spec=spec, params={p.name: tensors[p.name] for p in param_table(spec)}, stored_dtype=stored, source=str(path),
        synthetic=metadata.get("synthetic") == "true", metadata=metadata,
    )
