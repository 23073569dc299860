"""Property-based fuzzing of the loaders that read other people's files (issue 15, SPEC.md 8): the
safetensors reader (canonical and Hugging Face), the shard-index reader and the llm.c reader, fed
mutated and generated files. Whatever the bytes:

- only gptspec's own errors escape (SpecError, WeightsError, InputError, BackendError);
- each call returns within a few seconds;
- the memory it allocates stays within a small multiple of the input's size.

Memory is measured with tracemalloc's peak over the call: it resets per call (a process's
ru_maxrss only ever grows, so it cannot tell one example from the next) and sees numpy's buffers
and every Python object, which is where an inflated claim would cost (a per-layer table, a view per
tensor). It does not see allocations inside safetensors' Rust code, which maps the file rather than
copying it.

GPTSPEC_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_loaders.py runs a longer session by hand.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from gptspec.spec import BackendError, InputError, ModelSpec, SpecError, WeightsError
from gptspec.weights import load_checkpoint, save, synthetic_params, write_hf, write_llmc
from gptspec.weights.llmc import HEADER_INTS, MAGIC

GPTSPEC_ERRORS = (SpecError, WeightsError, InputError, BackendError)
EXAMPLES = int(os.environ.get("GPTSPEC_FUZZ_EXAMPLES", "40"))
SECONDS = 3.0
MEMORY_FACTOR, MEMORY_SLACK = 16, 4 << 20  # peak <= 16 x the input's bytes + 4 MiB
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPEC = ModelSpec.preset("test-tiny")
PARAMS = synthetic_params(SPEC, 0)


def _bytes_of(write) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return Path(write(Path(d))).read_bytes()


CANONICAL = _bytes_of(lambda d: save(d / "m.safetensors", SPEC, PARAMS, "bfloat16"))
LLMC = _bytes_of(lambda d: write_llmc(d / "m.bin", SPEC, PARAMS))


def load_file_within_bounds(data: bytes, name: str) -> None:
    """`data` written to a fresh file called `name`, then load_within_bounds."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        load_within_bounds(path, len(data))


def load_within_bounds(path: Path, input_bytes: int) -> None:
    """load_checkpoint(path) ends in a Checkpoint or gptspec's error, in time and memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        load_checkpoint(path)
    except GPTSPEC_ERRORS:
        pass
    finally:
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert seconds < SECONDS, f"{path.name}: {seconds:.2f}s"
    assert peak <= MEMORY_FACTOR * input_bytes + MEMORY_SLACK, f"{path.name}: {peak:,} bytes for {input_bytes:,}"


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


# -- safetensors -------------------------------------------------------------------------------------
@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(CANONICAL) - 1), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, len(CANONICAL)))
def test_mutated_canonical_files(edits, cut):
    data = mutate(CANONICAL, edits, cut)
    load_file_within_bounds(data, "m.safetensors")


SIZES = st.sampled_from([0, -1, 2**31, 10**6, 10**30]) | st.integers(1, 64)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)


@st.composite
def model_specs(draw):
    """ModelSpec JSON that lies: its sizes anything, its fields sometimes of the wrong type."""
    spec = json.loads(SPEC.to_json())
    sizes = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    # one size lying at a time, mostly: several at once rarely make a valid ModelSpec, which is
    # where an unbounded claim would cost
    for key in {draw(st.sampled_from(sizes)) for _ in range(draw(st.integers(1, 2)))}:
        spec[key] = draw(SIZES)
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.sampled_from(sorted(spec)))] = draw(JSON_SCALARS)
    return json.dumps(spec)


@st.composite
def safetensors_files(draw):
    """A well-framed safetensors file whose header says what it likes: tensors of generated dtypes,
    shapes and offsets, the metadata's model_spec lying."""
    n_bytes = draw(st.integers(0, 512))
    header = {}
    for i in range(draw(st.integers(0, 6))):
        shape = draw(st.lists(st.integers(0, 40) | st.sampled_from([2**40, 10**12]), max_size=3))
        begin = draw(st.integers(0, n_bytes))
        end = draw(st.integers(begin, n_bytes) | st.sampled_from([2**63, n_bytes + 1]))
        header[draw(st.sampled_from(list(PARAMS)) | st.text(max_size=8))] = {
            "dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "XX"])),
            "shape": shape, "data_offsets": [begin, end]}
    header["__metadata__"] = {"model_spec": draw(model_specs()), "spec_version": "1"}
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + draw(st.binary(min_size=n_bytes, max_size=n_bytes))


@FUZZ
@given(data=safetensors_files())
def test_generated_safetensors_headers(data):
    load_file_within_bounds(data, "m.safetensors")


@FUZZ
@given(spec=model_specs())
def test_lying_model_specs_over_real_tensors(spec):
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        save_file(dict(PARAMS), str(path), metadata={"model_spec": spec, "spec_version": "1"})
        load_within_bounds(path, path.stat().st_size)


# -- Hugging Face: config.json and the shard index ---------------------------------------------------
SHARD_NAMES = st.sampled_from(["shard.safetensors", "../shard.safetensors", "/etc/passwd", "sub/../shard.safetensors",
                               "model.safetensors.index.json", "", ".", "shard.bin", "C:\\x.safetensors"]) | st.text(
    max_size=16)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)


@FUZZ
@given(weight_map=st.dictionaries(st.sampled_from(list(PARAMS)) | st.text(max_size=6), SHARD_NAMES | JSON, max_size=6)
       | JSON, wrapped=st.booleans(),
       config=st.none() | st.dictionaries(st.sampled_from(["n_layer", "n_embd", "n_head", "vocab_size", "n_inner",
                                                            "model_type", "n_positions"]), JSON_SCALARS | SIZES))
def test_generated_shard_indexes_and_configs(weight_map, wrapped, config):
    with tempfile.TemporaryDirectory() as d:
        hf = write_hf(Path(d) / "hf", SPEC, PARAMS)
        (hf / "model.safetensors").rename(hf / "shard.safetensors")
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map} if wrapped
                                                                    else weight_map))
        if config is not None:
            base = json.loads((hf / "config.json").read_text())
            (hf / "config.json").write_text(json.dumps(dict(base, **config)))
        size = sum(p.stat().st_size for p in hf.iterdir())
        load_within_bounds(hf, size)


# -- llm.c -------------------------------------------------------------------------------------------
@st.composite
def llmc_files(draw):
    """An llm.c header of generated sizes; a body sometimes of exactly the length it implies."""
    header = np.zeros(HEADER_INTS, "<i4")
    version = draw(st.sampled_from([3, 5]) | st.integers(-5, 10))
    L, C, T, V = (draw(st.integers(1, 6) | st.sampled_from([0, -1, 2**31 - 1, 50_000])) for _ in range(4))
    H = draw(st.integers(1, 4) | st.sampled_from([0, -3]))
    Vp = draw(st.sampled_from([128, 256]) | st.integers(-1, 300))
    header[:8] = [draw(st.sampled_from([MAGIC, MAGIC + 1])), version, T, V, L, H, C, Vp]
    implied = 0
    if min(L, C, T, Vp) > 0:
        implied = (Vp * C + T * C + L * (12 * C * C + 13 * C) + 2 * C) * (4 if version == 3 else 2)
    n_body = implied if draw(st.booleans()) and implied <= 1 << 20 else draw(st.integers(0, 4096))
    return header.tobytes() + draw(st.binary(min_size=min(n_body, 64), max_size=min(n_body, 64))) + bytes(
        max(n_body - 64, 0))


@FUZZ
@given(data=llmc_files())
def test_generated_llmc_headers(data):
    load_file_within_bounds(data, "m.bin")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 64), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, len(LLMC)))
def test_mutated_llmc_headers(edits, cut):
    data = mutate(LLMC, edits, cut)
    load_file_within_bounds(data, "m.bin")
