"""Loading without copies (issue 17): a safetensors checkpoint (canonical or Hugging Face) is read as
memory-mapped views, each backend builds its tensors from them one at a time, and nothing of the file
stays materialized after the build; the values and the logits are bit-exact with the file as
safetensors itself reads it. Where no cast or transpose is needed, torch's parameters are views of a
private copy-on-write mapping of the file (no copy at all), which a write into the model never reaches.
Peak memory is measured, not asserted, in bench/load_memory.py."""
from __future__ import annotations

import gc
import hashlib
import mmap
import os
import sys
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gptspec.spec import ModelSpec, param_table
from gptspec.weights import load_checkpoint, save, synthetic_params, write_hf
from gptspec.weights.format import MappedTensors

SPEC = ModelSpec.preset("test-tiny")


def oracle(path, spec: ModelSpec, layout: str) -> dict[str, np.ndarray]:
    """The canonical parameters as safetensors' own numpy loader reads a float32 file, in the old path's
    form (Conv1D weights transposed into new contiguous arrays)."""
    raw = load_file(str(path))
    out = {}
    for p in param_table(spec):
        a = raw["transformer." + p.name] if layout == "hf" else raw[p.name]
        out[p.name] = np.ascontiguousarray(a.T) if layout == "hf" and p.hf_transposed else a
    return out


def mapped_memory(a: np.ndarray) -> bool:
    """Whether `a`'s memory is a memory mapping (its base chain ends in an mmap)."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


@pytest.fixture(scope="module", params=["canonical", "hf"])
def checkpoint_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("loading") / ("w.safetensors" if request.param == "canonical" else "hf")
    params = synthetic_params(SPEC, 3, "gpt2")
    (save if request.param == "canonical" else write_hf)(path, SPEC, params, "float32")
    return path, request.param


def test_params_are_views_of_the_mapped_file(checkpoint_file):
    path, layout = checkpoint_file
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.params, MappedTensors) and ckpt.params.materialized == []
    want = oracle(path if layout == "canonical" else path / "model.safetensors", SPEC, layout)
    for name, expected in want.items():
        got = ckpt.params[name]
        assert mapped_memory(got), f"{name} is a copy, not a view of the mapped file"
        assert not got.flags.writeable, f"{name}: a view of the file must be read-only"
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
        del got
    assert ckpt.params.materialized == [], "an array nobody holds is unmapped"


def test_bfloat16_file_is_widened_on_access(tmp_path):
    params = synthetic_params(SPEC, 1, "gpt2")
    path = save(tmp_path / "bf16.safetensors", SPEC, params, "bfloat16")
    torch_loader = pytest.importorskip("safetensors.torch")  # numpy's loader has no bfloat16; torch's does
    ckpt = load_checkpoint(path)
    raw = torch_loader.load_file(str(path))
    for name in params:
        assert ckpt.params[name].dtype == np.float32
        assert np.array_equal(ckpt.params[name], raw[name].float().numpy()), name


def test_a_replaced_file_does_not_change_a_checkpoint_read_before(tmp_path):
    """The mapping is made from the descriptor the checks ran on: a file renamed over the path later (as
    every gptspec write does) is not mixed into the checkpoint read before."""
    path = tmp_path / "w.safetensors"
    first = synthetic_params(SPEC, 1, "gpt2")
    save(path, SPEC, first, "float32")
    ckpt = load_checkpoint(path)
    save(path, SPEC, synthetic_params(SPEC, 2, "gpt2"), "float32")
    for name, a in first.items():
        assert np.array_equal(ckpt.params[name], a), name


class _OneAtATime(Mapping):
    """The checkpoint's params, recording how many source arrays were alive each time one was asked for."""

    def __init__(self, mapped: MappedTensors):
        self.mapped, self.alive_at_access = mapped, []

    def __getitem__(self, name):
        self.alive_at_access.append(len(self.mapped.materialized))
        return self.mapped[name]

    def __iter__(self):
        return iter(self.mapped)

    def __len__(self):
        return len(self.mapped)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backend_builds_one_tensor_at_a_time_bit_exact(backend, dtype, checkpoint_file):
    """Each backend reads the mapped sources one at a time and keeps none of them (no alias of the file),
    and its logits are bit-exact with a model built from safetensors' own arrays (the pre-issue-17 path)."""
    if dtype not in backend.dtypes(backend.devices()[0]):
        pytest.skip(f"{backend.name} has no {dtype} here")
    path, _ = checkpoint_file
    ckpt = load_checkpoint(path)
    watched = _OneAtATime(ckpt.params)
    model = backend.build(SPEC, watched, dtype)
    # at most one: Backend.build's shape check holds the previous array (never touched) while it gets the next
    assert max(watched.alive_at_access) <= 1, "source arrays accumulated while the model was built"
    assert ckpt.params.materialized == [], f"the {backend.name} model holds arrays of the mapped file"
    layout = "canonical" if path.suffix == ".safetensors" else "hf"
    old = backend.build(SPEC, oracle(path if layout == "canonical" else path / "model.safetensors", SPEC, layout), dtype)
    tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (2, 9))
    np.testing.assert_array_equal(backend.forward(model, tokens), backend.forward(old, tokens))
    loaded = backend.load(path, dtype=dtype)  # the public path: Backend.load, the reader, the build
    np.testing.assert_array_equal(backend.forward(loaded, tokens), backend.forward(old, tokens))
    # decoding: single-token matmuls, where a transposed weight layout rounds differently in some BLAS (torch
    # copies Conv1D weights for that; MLX keeps them transposed, which this holds bit-exact). tinygrad copies
    # every tensor into its own contiguous buffer, and compiles its decoding kernels per position (seconds).
    if backend.name != "tinygrad":
        np.testing.assert_array_equal(decode(backend, loaded, tokens[:, :3]), decode(backend, old, tokens[:, :3]))


def decode(backend, model, tokens: np.ndarray) -> np.ndarray:
    """The logits of feeding `tokens` one position at a time through the KV cache."""
    cache, out = None, []
    for t in range(tokens.shape[1]):
        logits, cache = backend.extend(model, tokens[:, t:t + 1], cache)
        out.append(logits)
    return np.concatenate(out, axis=1)


def file_mapping(address: int) -> tuple[str, str] | None:
    """(path, permissions) of the file mapping holding `address` in this process (/proc/self/maps, the
    kernel's own account), or None where the address lies in no file mapping (the heap, an anonymous one)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return (fields[5], fields[1]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


linux_maps = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")


def weights_file(path: Path) -> Path:
    return path if path.suffix == ".safetensors" else path / "model.safetensors"


@linux_maps
@pytest.mark.parametrize("stored, dtype", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
@pytest.mark.parametrize("layout", ["canonical", "hf"])
def test_torch_parameters_are_the_files_pages_where_nothing_changes(tmp_path, layout, stored, dtype):
    """A torch parameter stored in its canonical layout and loaded in the file's dtype is a view of a private
    (copy-on-write) mapping of the file: no copy at load. A cast, or a Hugging Face Conv1D weight stored (in,
    out), is a copy that holds no page of the file. The values are the file's either way."""
    torch = pytest.importorskip("torch")
    from gptspec import backends

    params = synthetic_params(SPEC, 4, "gpt2")
    path = (save(tmp_path / "w.safetensors", SPEC, params, stored) if layout == "canonical"
            else write_hf(tmp_path / "hf", SPEC, params, stored))
    model = backends.load("torch", path, dtype=dtype)
    real = os.path.realpath(weights_file(path))
    transposed = {p.name for p in param_table(SPEC) if p.hf_transposed and layout == "hf"}
    for name, p in model.named_parameters():
        where = file_mapping(p.data_ptr())
        if dtype == stored and name not in transposed:
            assert where is not None and where[0] == real, f"{name} is a copy, not the file's pages"
            assert where[1][3] == "p", f"{name}: the mapping must be private (copy-on-write), not {where[1]}"
            assert p.is_contiguous(), name
        else:
            assert where is None, f"{name} was cast or transposed, yet lies in {where}"
            assert p.is_contiguous(), f"{name}: a copy is laid out contiguous, as nn.Linear's own weights"
        want = torch.from_numpy(np.ascontiguousarray(params[name])).to(getattr(torch, dtype))
        if stored == "bfloat16":
            want = torch.from_numpy(np.ascontiguousarray(params[name])).to(torch.bfloat16).to(getattr(torch, dtype))
        assert torch.equal(p.detach(), want), name


@linux_maps
def test_writing_into_a_loaded_model_changes_neither_the_file_nor_the_next_load(tmp_path):
    """The model's pages are private: an in-place update (an optimizer step, normalize_) never reaches the
    file, a second load, or a checkpoint's own view of the file."""
    torch = pytest.importorskip("torch")
    from gptspec import backends

    params = synthetic_params(SPEC, 5, "gpt2")
    path = save(tmp_path / "w.safetensors", SPEC, params, "float32")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt = load_checkpoint(path)
    model = backends.get("torch").build(SPEC, ckpt.params, "float32")
    assert file_mapping(model.wte.weight.data_ptr()) is not None, "the premise: the model holds the file's pages"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), torch.from_numpy(params[name]) + 1.0), f"{name}: the write did not land"
        np.testing.assert_array_equal(ckpt.params[name], params[name], err_msg=f"{name}: the checkpoint's view")
    del model
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the file changed"
    again = backends.get("torch").state(backends.load("torch", path))
    for name, a in params.items():
        np.testing.assert_array_equal(again[name], a, err_msg=f"{name} in a second load")


def test_stored_views_are_the_files_bytes_private_ones_writable_without_writing_through(checkpoint_file):
    """MappedTensors.stored gives each tensor as stored (no transpose), read-only or private: writable,
    and a write lands in the process's own page, never in the file or in another view."""
    path, layout = checkpoint_file
    ckpt = load_checkpoint(path)
    raw = load_file(str(weights_file(path)))
    for p in param_table(SPEC):
        stored = ckpt.params.stored(p.name)
        key = "transformer." + p.name if layout == "hf" else p.name
        assert stored.dtype == "float32" and stored.transposed == (layout == "hf" and p.hf_transposed), p.name
        assert not stored.array.flags.writeable and np.array_equal(stored.array, raw[key]), p.name
    before = hashlib.sha256(weights_file(path).read_bytes()).hexdigest()
    private = ckpt.params.stored("wte.weight", private=True).array
    assert private.flags.writeable and mapped_memory(private)
    private += 1.0
    np.testing.assert_array_equal(ckpt.params.stored("wte.weight").array + 1.0, private)
    assert hashlib.sha256(weights_file(path).read_bytes()).hexdigest() == before


def test_reading_holds_no_copy_of_the_weights(tmp_path):
    """tracemalloc sees numpy's allocations: reading (with its finiteness check) and fingerprinting a
    checkpoint peak near one tensor's size, not the file's, which the old reader materialized whole."""
    from gptspec.weights.format import fingerprint

    spec = ModelSpec.preset("test-mini").replace(n_layer=16)  # 3.3 MB, its largest tensor 66 kB
    params = synthetic_params(spec, 0, "gpt2")
    write_hf(tmp_path, spec, params, "float32")
    largest = max(a.nbytes for a in params.values())
    total = sum(a.nbytes for a in params.values())
    del params
    tracemalloc.start()
    try:
        ckpt = load_checkpoint(tmp_path)
        fingerprint(ckpt.spec, ckpt.params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * largest + (512 << 10) < total / 4, (peak, largest, total)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_reads_on_first_use_the_file_that_was_checked(tmp_path, dtype):
    """MLX's parameters come from mx.load of the checked file (its descriptor), read on first use: a file
    renamed over the path (as every gptspec write does) after the checks, or after the build and before that
    first use, is not what the model reads."""
    pytest.importorskip("mlx.core")
    from gptspec import backends

    backend = backends.get("mlx")
    first = synthetic_params(SPEC, 6, "gpt2")
    path = save(tmp_path / "w.safetensors", SPEC, first, "float32")
    ckpt = load_checkpoint(path)  # the checks
    save(path, SPEC, synthetic_params(SPEC, 7, "gpt2"), "float32")
    model = backend.build(SPEC, ckpt.params, dtype)
    save(path, SPEC, synthetic_params(SPEC, 8, "gpt2"), "float32")
    del ckpt  # its descriptor closes; its number goes to another file: MLX holds its own
    gc.collect()
    others = [os.open(path, os.O_RDONLY) for _ in range(8)]
    try:
        tokens = np.random.default_rng(1).integers(0, SPEC.vocab_size, (2, 7))
        np.testing.assert_array_equal(backend.forward(model, tokens),
                                      backend.forward(backend.build(SPEC, first, dtype), tokens))
    finally:
        for fd in others:
            os.close(fd)


def test_shapes_of_a_mapped_checkpoint_map_nothing(checkpoint_file, monkeypatch):
    """shapes_of answers a MappedTensors from the header (a bfloat16 file's tensors would otherwise be widened
    whole just to be measured), with the shapes the arrays have."""
    from gptspec.weights import format as fmt

    path, _ = checkpoint_file
    ckpt = load_checkpoint(path)
    mapped = []
    real = fmt._OpenFile.view
    monkeypatch.setattr(fmt._OpenFile, "view", lambda self, *a, **k: mapped.append(a) or real(self, *a, **k))
    shapes = fmt.shapes_of(ckpt.params)
    assert mapped == [], "measuring the shapes mapped tensors"
    views = {name: ckpt.params[name] for name in ckpt.params}
    assert shapes == {name: a.shape for name, a in views.items()}
    assert fmt.shapes_of(views) == shapes
