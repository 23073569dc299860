"""weights/atomic.py, the one way gptspec writes a file: all or nothing, with the user's umask."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from gptspec.conformance import artifact_file
from gptspec.spec import ModelSpec, WeightsError
from gptspec.weights import save, synthetic_params, write_hf, write_llmc, write_nanogpt
from gptspec.weights.atomic import atomic_write

SPEC = ModelSpec.preset("test-tiny")


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_written_file_gets_the_mode_open_would_give(tmp_path, umask):
    with open(tmp_path / "plain", "w"):  # the oracle: what any other tool's open() creates
        pass
    with atomic_write(tmp_path / "sub" / "f.bin") as tmp:
        tmp.write_bytes(b"data")
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"data"
    assert mode(tmp_path / "sub" / "f.bin") == mode(tmp_path / "plain") == 0o666 & ~umask


def test_every_writer_creates_files_with_the_umask(tmp_path, umask):
    params = synthetic_params(SPEC, 0)
    written = [save(tmp_path / "m.safetensors", SPEC, params),
               write_llmc(tmp_path / "m.bin", SPEC, params)]
    hf = write_hf(tmp_path / "hf", SPEC, params)
    written += [hf / "model.safetensors", hf / "config.json"]
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        written.append(write_nanogpt(tmp_path / "ckpt.pt", SPEC, params))
    tensors = {"tokens": np.zeros((1, 2), np.int64)}
    written.append(artifact_file.write(tmp_path / "a.safetensors", tensors, {"format": "x"}))
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}
    assert not list(tmp_path.rglob("*.partial"))


class Interrupted(BaseException):
    """Raised by a writer halfway, as KeyboardInterrupt would be."""


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt(), Interrupted()])
def test_a_write_that_fails_midway_leaves_nothing_and_the_old_file_untouched(tmp_path, error):
    dest = tmp_path / "f.bin"
    with pytest.raises(type(error)):
        with atomic_write(dest) as tmp, open(tmp, "wb") as f:
            f.write(b"half of it")
            raise error
    assert os.listdir(tmp_path) == []

    dest.write_bytes(b"the previous version")
    os.chmod(dest, 0o600)
    with pytest.raises(type(error)):
        with atomic_write(dest) as tmp:
            tmp.write_bytes(b"the new vers")
            raise error
    assert os.listdir(tmp_path) == ["f.bin"]
    assert dest.read_bytes() == b"the previous version" and mode(dest) == 0o600


def test_the_temporary_file_is_beside_the_destination_and_replaces_it(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with atomic_write(dest) as tmp:
        # in a hidden staging directory beside it, named so that a later run recognises its own leftovers
        assert tmp.parent.parent == dest.parent and tmp.name == "f.bin"
        assert tmp.parent.name.startswith(".f.bin.gptspec-") and tmp.parent.name.endswith(".partial")
        assert tmp.exists() and tmp.read_bytes() == b""  # a fresh empty file, not the destination
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old"  # readers see the old file until the body finishes
    assert dest.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_a_failed_hf_write_changes_neither_file(tmp_path):
    params = synthetic_params(SPEC, 0)
    hf = write_hf(tmp_path / "hf", SPEC, params)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    bad = dict(params, **{"ln_f.bias": np.full_like(params["ln_f.bias"], np.nan)})
    with pytest.raises(WeightsError, match="NaN or Inf"):
        write_hf(hf, SPEC, bad, synthetic=True)  # its config.json would differ: it would say synthetic
    assert {p.name: p.read_bytes() for p in Path(hf).iterdir()} == before
