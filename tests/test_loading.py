"""Loading without copies (issue 17): a safetensors checkpoint (canonical or Hugging Face) is read as
memory-mapped views, each backend builds its tensors from them one at a time, and nothing of the file
stays materialized after the build; the values and the logits are bit-exact with the file as
safetensors itself reads it. Peak memory is measured, not asserted, in bench/load_memory.py."""
from __future__ import annotations

import mmap
import tracemalloc
from collections.abc import Mapping

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
