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
import mmap
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    float32, which is exact) and `stored_dtype` says what the file held. Read from a safetensors file
    (canonical or Hugging Face), `params` is a MappedTensors: each array is a read-only view of the
    mapped file, made when asked for and unmapped when dropped (weights/format.py).
    """

    spec: ModelSpec
    params: Mapping[str, np.ndarray]
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
    # in place, one temporary: loading casts whole checkpoints through here (2-4x faster than the plain form)
    rounded = u >> 16
    rounded &= np.uint32(1)
    rounded += u
    rounded += np.uint32(0x7FFF)  # wraps modulo 2**32 as the plain form did; NaN is replaced below
    rounded >>= 16
    bits = rounded.astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        bits[nan] = np.uint16(0x7FC0)
    return bits


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
_NUMPY_CODES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor lies in an open file, and how it becomes its canonical array."""

    file: "_OpenFile"
    offset: int       # bytes from the start of the file
    code: str         # safetensors dtype: F32, F16 or BF16
    shape: tuple[int, ...]
    key: str          # its name in the file
    transposed: bool = False  # a Hugging Face Conv1D weight: the canonical array is its transpose

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transposed else self.shape

    def bytes_as_stored(self, private: bool = False) -> np.ndarray:
        """The tensor's bytes in the file's dtype (bfloat16 as uint16 bits) and layout, over a mapping:
        read-only, or `private`: writable, copy-on-write (see MappedTensors.stored)."""
        count = int(np.prod(self.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(self.shape, _NUMPY_CODES[self.code])
        return self.file.view(self.offset, count, _NUMPY_CODES[self.code], private).reshape(self.shape)

    def array(self) -> np.ndarray:
        """The tensor as a read-only numpy view of a mapping of its bytes (bfloat16 widened to a new
        float32 array): the pages are read when touched and unmapped when the array is dropped."""
        stored = self.bytes_as_stored()
        if self.code == "BF16":
            stored = from_bfloat16_bits(stored)
        return stored.T if self.transposed else stored


class _OpenFile:
    """An open descriptor of a weights file. Mappings are made from it, never from the path, so a file
    replaced on disk after it was checked (weights/atomic.py renames the new one in) never mixes with it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self.fd)

    @property
    def by_descriptor(self) -> str | None:
        """A path that opens this descriptor's own file (the one checked), whatever is renamed over `path`
        later; None where the system has no /dev/fd."""
        return f"/dev/fd/{self.fd}" if os.path.isdir("/dev/fd") else None

    def view(self, offset: int, count: int, dtype: str, private: bool = False) -> np.ndarray:
        """`count` items of `dtype` at `offset`, over a read-only shared mapping or, `private`, a writable
        copy-on-write one (MAP_PRIVATE: a written page becomes the process's own; the file never changes)."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        nbytes = count * np.dtype(dtype).itemsize
        access = mmap.ACCESS_COPY if private else mmap.ACCESS_READ
        mapped = mmap.mmap(self.fd, offset - start + nbytes, offset=start, access=access)
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start)


@dataclass(frozen=True)
class TensorInFile:
    """Where a framework's own safetensors loader finds one tensor: `path` opens the very file gptspec's
    checks ran on (its descriptor, /dev/fd/N: a file renamed over the original path later is not it),
    `key` is the tensor's name there; `dtype` and `transposed` as in StoredTensor."""

    path: str
    key: str
    dtype: str
    transposed: bool


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its file stores it. `array` holds its bytes in the file's `dtype` ("float32",
    "float16" or "bfloat16", whose bit patterns numpy holds as uint16) and the file's layout: the
    canonical tensor is `array.T` where `transposed` (a Hugging Face Conv1D weight), else `array`."""

    array: np.ndarray
    dtype: str
    transposed: bool


class MappedTensors(Mapping):
    """Tensors of weights files, read on access: `m[name]` is a read-only numpy array over a memory
    mapping of the file (a transposed view for a Hugging Face Conv1D weight; bfloat16 widened to a new
    float32 array), unmapped once the caller drops it. So a backend that builds its tensors one at a
    time holds at most one source tensor at once, and nothing of the file stays resident after the
    build. While an array of a tensor is alive, `m[name]` returns that same array."""

    def __init__(self, stored: Mapping[str, _Stored]):
        self._stored = dict(stored)
        self._alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._alive.get(name)
        if array is None:
            array = self._stored[name].array()
            self._alive[name] = array
        return array

    def __iter__(self):
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __repr__(self) -> str:
        files = sorted({str(s.file.path) for s in self._stored.values()})
        return f"MappedTensors({len(self)} tensors of {', '.join(files)})"

    def stored(self, name: str, private: bool = False) -> StoredTensor:
        """The tensor as the file stores it (no transpose, no widening), for a backend that makes its
        parameter from the file's own bytes. Read-only, or `private`: a writable copy-on-write mapping,
        whose pages are the page cache's (read on first touch, never copied) until one is written, when
        that page becomes the writer's own. So a parameter made of it costs no copy and no read at load,
        and an in-place update (normalize_, an optimizer step) never reaches the file, nor any other
        mapping of it (`m[name]` included)."""
        stored = self._stored[name]
        return StoredTensor(stored.bytes_as_stored(private), STORED_DTYPES[stored.code], stored.transposed)

    def in_file(self, name: str) -> TensorInFile | None:
        """Where the tensor lies, for a framework loader that reads safetensors files itself, lazily (MLX's
        mx.load): the reading then happens on the framework's first use, after every check here ran on the
        same file. None where the system cannot reopen a descriptor (no /dev/fd)."""
        stored = self._stored[name]
        path = stored.file.by_descriptor
        if path is None:
            return None
        return TensorInFile(path, stored.key, STORED_DTYPES[stored.code], stored.transposed)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape as `m[name]` gives it, without mapping anything."""
        return {n: s.canonical_shape for n, s in self._stored.items()}

    @property
    def materialized(self) -> list[str]:
        """The tensors whose arrays are alive now (held by someone)."""
        return list(self._alive.keys())

    def renamed(self, names: Mapping[str, tuple[str, bool]]) -> "MappedTensors":
        """A new mapping: new name -> (this mapping's name, whether to transpose it)."""
        return MappedTensors({
            new: replace(self._stored[old], transposed=self._stored[old].transposed != transpose)
            for new, (old, transpose) in names.items()
        })

    def merged(self, other: "MappedTensors") -> "MappedTensors":
        return MappedTensors({**self._stored, **other._stored})


def shapes_of(params: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape; a MappedTensors answers from the header, mapping (and widening) nothing."""
    if isinstance(params, MappedTensors):
        return params.shapes
    return {n: np.shape(a) for n, a in params.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[MappedTensors, dict[str, str], str]:
    """The tensors of a safetensors file, mapped (MappedTensors: nothing is read until a tensor is used),
    its metadata, and its dtype.

    safetensors validates the header (offsets inside the file, no overlap, sizes that match the shapes)
    before anything is mapped. Raises WeightsError naming the file for a missing, truncated or corrupt
    file, and for a tensor whose dtype is not a float type of the spec.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        file = _OpenFile(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot be opened: {e}") from None
    try:
        # the descriptor's own file: the one that is mapped below is the one safetensors checked
        with safe_open(file.by_descriptor or str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            codes = {n: f.get_slice(n).get_dtype() for n in names}
            bad = {n: c for n, c in codes.items() if c not in STORED_DTYPES}
            if bad:
                shown = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:5])
                raise WeightsError(
                    f"{path}: tensors must be F32, F16 or BF16; found {shown}"
                )
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    header_length = int.from_bytes(os.pread(file.fd, 8, 0), "little")
    header = json.loads(os.pread(file.fd, header_length, 8))  # already validated by safetensors
    stored = {
        n: _Stored(file, 8 + header_length + header[n]["data_offsets"][0], codes[n], tuple(header[n]["shape"]), n)
        for n in names
    }
    dtypes = {STORED_DTYPES[c] for c in codes.values()}
    kind = dtypes.pop() if len(dtypes) == 1 else "mixed"
    return MappedTensors(stored), metadata, kind


def check_finite(params: Mapping[str, np.ndarray], source: str) -> None:
    """SPEC.md 8: a checkpoint read from a file holds finite weights only. A NaN must not reach the
    suite as weights: torch's CPU attention turns a NaN query into zeros, so it would hide there while
    the reference and the other backends show it (tests/test_hostile_files.py pins that behaviour).
    Negative controls that need a NaN on purpose build their model in memory (a Checkpoint, or
    Backend.build with the parameters), which does not pass through here."""
    for name, a in params.items():
        # One pass, no temporary: a sum is finite only if every term is (NaN and Inf never turn finite
        # again), 3x faster than isfinite().all(). A finite file whose sum overflows takes the exact count.
        with np.errstate(over="ignore", invalid="ignore"):
            total = a.sum(dtype=np.float32 if a.dtype == np.float16 else a.dtype)
        if np.isfinite(total):
            continue
        finite = np.isfinite(a)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise WeightsError(f"{source}: tensor {name!r} holds {bad:,} NaN or Inf value(s) of {finite.size:,}; "
                               "a checkpoint's weights must be finite")


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
    check_state_shapes(spec, tensors.shapes, str(path))
    params = tensors.renamed({p.name: (p.name, False) for p in param_table(spec)})
    check_finite(params, str(path))
    return Checkpoint(
        spec=spec, params=params, stored_dtype=stored, source=str(path),
        synthetic=metadata.get("synthetic") == "true", metadata=metadata,
    )
