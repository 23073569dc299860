"""Files from other people and careless input (issue 15): a corpus of hostile files generated here,
one test per class of failure. Each must end in gptspec's own error naming the thing, quickly, or in
the right result; never a hang, a traceback, a leftover or a silently different model.

    lying ModelSpecs (canonical metadata, config.json, nanoGPT-free), inflated llm.c headers,
    artifacts naming a bigger preset than they hold; traversing and malformed shard indexes;
    bad devices, token dtypes, seeds and output paths; renamed files and FIFOs; NaN weights;
    interrupted writes; relabelled and edited artifacts.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gptspec import backends, cli
from gptspec.conformance import artifact_file, crossmachine
from gptspec.conformance.artifact_file import ArtifactError
from gptspec.conformance.cases import Case
from gptspec.spec import BackendError, InputError, ModelSpec, WeightsError
from gptspec.weights import load_checkpoint, save, synthetic_params, write_hf, write_llmc
from gptspec.weights import atomic
from gptspec.weights.llmc import HEADER_INTS, MAGIC

SPEC = ModelSpec.preset("test-tiny")
PARAMS = synthetic_params(SPEC, 0)
needs_torch = pytest.mark.skipif("torch" not in backends.available(), reason="needs torch")


def quickly(fn, seconds: float = 2.0):
    """fn() must raise WeightsError within `seconds`; its message is returned."""
    start = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        fn()
    assert time.perf_counter() - start < seconds, f"took {time.perf_counter() - start:.1f}s"
    return str(e.value)


# -- 1. claims bounded by what a file holds -------------------------------------------------------
def lying_canonical(path: Path, n_layer: int) -> Path:
    claim = json.loads(SPEC.to_json())
    claim["n_layer"] = n_layer
    save_file(dict(PARAMS), str(path), metadata={"model_spec": json.dumps(claim), "spec_version": "1"})
    return path


@pytest.mark.parametrize("n_layer", [10**6, 10**30])
def test_a_lying_n_layer_in_canonical_metadata_fails_at_once(tmp_path, n_layer):
    message = quickly(lambda: load_checkpoint(lying_canonical(tmp_path / "m.safetensors", n_layer)), 0.5)
    assert f"n_layer={n_layer}" in message and "the file holds 16" in message


def test_a_lying_config_json_fails_at_once(tmp_path):
    hf = write_hf(tmp_path / "hf", SPEC, PARAMS)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, n_layer=10**30)))
    assert "the file holds 16" in quickly(lambda: load_checkpoint(hf), 0.5)


def test_an_honest_near_miss_still_names_the_missing_tensor(tmp_path):
    params = {n: a for n, a in PARAMS.items() if n != "ln_f.bias"}
    save_file(params, str(tmp_path / "m.safetensors"), metadata={"model_spec": SPEC.to_json(), "spec_version": "1"})
    assert "missing 1 tensor(s): ln_f.bias" in quickly(lambda: load_checkpoint(tmp_path / "m.safetensors"))


def inflated_llmc(path: Path, n_layer: int, C: int = 1) -> Path:
    """A consistent llm.c file (its size is what its header says) of many layers of width C."""
    header = np.zeros(HEADER_INTS, "<i4")
    header[:8] = [MAGIC, 3, 1, 1, n_layer, 1, C, 128]
    per_layer = 12 * C * C + 13 * C
    n = 128 * C + C + n_layer * per_layer + 2 * C
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.full(n, 0.01, "<f4").tobytes())
    return path


def test_an_llmc_header_of_many_thin_layers_is_refused_before_reading(tmp_path):
    path = inflated_llmc(tmp_path / "m.bin", 20_000)  # 2 MB; read, it cost ~80x that
    message = quickly(lambda: load_checkpoint(path), 0.5)
    assert "240,004 tensors" in message and "under 64 bytes a tensor" in message


def test_a_real_llmc_file_of_a_small_model_still_loads(tmp_path):
    path = write_llmc(tmp_path / "m.bin", SPEC, PARAMS, "bfloat16")
    assert load_checkpoint(path).spec == SPEC


# -- 2. shard indexes: inside the directory, well-formed, never themselves --------------------------
def hf_with_index(tmp_path: Path, weight_map) -> Path:
    hf = write_hf(tmp_path / "hf", SPEC, PARAMS)
    (hf / "model.safetensors").rename(hf / "shard.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return hf


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/abs/x.safetensors", "a/../../x.safetensors"])
def test_a_shard_outside_the_checkpoint_directory_is_refused(tmp_path, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(dict(PARAMS), str(outside / "x.safetensors"))  # a loadable file is there to be found
    hf = hf_with_index(tmp_path, {"wte.weight": shard})
    if shard.startswith("/"):
        shard = str(outside / "x.safetensors")
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": shard}}))
    message = quickly(lambda: load_checkpoint(hf))
    assert f"weight_map['wte.weight'] names {shard!r}, outside the checkpoint directory" in message


@pytest.mark.parametrize("weight_map, says", [
    ({"wte.weight": "model.safetensors.index.json"}, "not a .safetensors weights file"),
    (["shard.safetensors"], "got list"),
    ({"wte.weight": 7}, "is 7, not a shard file name"),
    ({}, "got dict"),
])
def test_a_malformed_shard_index_is_an_error_not_a_traceback(tmp_path, weight_map, says):
    assert says in quickly(lambda: load_checkpoint(hf_with_index(tmp_path, weight_map)))


def test_a_shard_index_inside_the_directory_still_loads(tmp_path):
    hf = hf_with_index(tmp_path, {n: "shard.safetensors" for n in PARAMS})
    assert np.array_equal(load_checkpoint(hf).params["wte.weight"], PARAMS["wte.weight"])


@pytest.mark.parametrize("config", [[], "gpt2", 3, {"n_embd": {"a": 1}, "n_inner": 4}])
def test_a_config_json_that_is_not_a_config_is_an_error(tmp_path, config):
    hf = write_hf(tmp_path / "hf", SPEC, PARAMS)
    (hf / "config.json").write_text(json.dumps(config))
    quickly(lambda: load_checkpoint(hf))


# -- 3. bad devices, token dtypes, seeds and output paths -------------------------------------------
@needs_torch
@pytest.mark.parametrize("device", ["metal", "tpu", "gpu", ""])
def test_torch_refuses_an_unknown_device_in_its_own_words(device):
    with pytest.raises(BackendError, match="torch backend runs on cpu, cuda or mps"):
        backends.get("torch").load("synthetic:test-tiny", device=device)


@needs_torch
@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "uint8", "uint16", "uint32", "uint64"])
def test_torch_takes_every_integer_token_dtype(dtype):
    b = backends.get("torch")
    model = b.build(SPEC, PARAMS)
    tokens = np.arange(12).reshape(2, 6) % SPEC.vocab_size
    expected = b.forward(model, tokens.astype(np.int64))
    assert np.array_equal(b.forward(model, tokens.astype(dtype)), expected)
    targets = np.roll(tokens, -1, axis=1)
    assert b.loss_and_grads(model, tokens.astype(dtype), targets.astype(dtype)).loss == \
        b.loss_and_grads(model, tokens, targets).loss


@pytest.mark.parametrize("name", [n for n in ("torch", "mlx") if n in backends.available()])
def test_object_token_arrays_are_an_input_error(name):
    b = backends.get(name)
    with pytest.raises(InputError, match="integer array"):
        b.forward(b.build(SPEC, PARAMS), np.array([[1, 2]], dtype=object))


def test_a_negative_seed_is_refused_by_name():
    assert "non-negative integer, got '-1'" in quickly(lambda: load_checkpoint("synthetic:test-tiny:-1"))
    with pytest.raises(WeightsError, match="non-negative"):
        synthetic_params(SPEC, -1)
    with pytest.raises(SystemExit) as e:
        cli.main(["synthetic", "test-tiny", "x.safetensors", "--seed", "-1"])
    assert e.value.code == 2


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptspec", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_conformance_json_into_a_missing_directory_fails_before_the_suite(tmp_path):
    start = time.perf_counter()
    r = run_cli("conformance", "--only", "test-tiny", "--no-training", "--json", str(tmp_path / "no" / "r.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'no'}: no such directory to write into" in r.stdout
    assert "gptspec conformance:" not in r.stdout and time.perf_counter() - start < 30


@pytest.mark.parametrize("dest, says", [
    ("adir", "is a directory, not a file to write"),
    ("afile/x.safetensors", "is not a directory"),
])
def test_an_output_path_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, dest, says):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    target = str(tmp_path / dest)
    rc = cli.main(["convert", "synthetic:test-tiny", target, "--to", "canonical"])
    assert rc == 2


def test_an_os_error_anywhere_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("gptspec.weights.format.write_safetensors", refuse)
    assert cli.main(["synthetic", "test-tiny", str(tmp_path / "m.safetensors")]) == 2
    out = capsys.readouterr().out
    assert f"error: {tmp_path / 'ro'}: Permission denied" in out and "Traceback" not in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_refused_before_the_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert cli.main(["synthetic", "test-tiny", str(ro / "m.safetensors")]) == 2


def test_weights_that_do_not_exist_are_an_error_even_when_their_case_is_not_selected():
    assert cli.main(["conformance", "--only", "test-tiny", "--weights", "/nonexistent/gpt2"]) == 2


# -- 4. what used to be accepted silently ---------------------------------------------------------
def test_a_canonical_file_renamed_without_its_suffix_still_loads(tmp_path):
    save(tmp_path / "m.safetensors", SPEC, PARAMS)
    (tmp_path / "m.safetensors").rename(tmp_path / "model")
    assert load_checkpoint(tmp_path / "model").spec == SPEC


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    assert "not a regular file or a directory (a FIFO)" in quickly(lambda: load_checkpoint(fifo), 1.0)


# -- 5. NaN never reaches the suite as weights ------------------------------------------------------
def test_a_nan_weight_is_refused_naming_the_tensor(tmp_path):
    bad = dict(PARAMS)
    bad["h.0.attn.c_attn.weight"] = bad["h.0.attn.c_attn.weight"].copy()
    bad["h.0.attn.c_attn.weight"][0, 0] = np.nan
    save_file(bad, str(tmp_path / "m.safetensors"), metadata={"model_spec": SPEC.to_json(), "spec_version": "1"})
    message = quickly(lambda: load_checkpoint(tmp_path / "m.safetensors"))
    assert "tensor 'h.0.attn.c_attn.weight' holds 1 NaN or Inf value(s)" in message


@needs_torch
def test_torch_cpu_attention_turns_a_nan_query_into_zeros():
    """Why the loader refuses NaN weights: torch's CPU scaled_dot_product_attention gives zeros, not
    NaN, for a NaN query row under a causal mask (torch 2.x). If this starts failing, torch changed,
    and the loader's check is the only thing that stood between a NaN and a finite logit."""
    import torch

    q = torch.randn(1, 1, 4, 8)
    k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    q[0, 0, 2] = float("nan")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    naive = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(
        torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf")), -1) @ v
    assert torch.isnan(naive[0, 0, 2]).all()  # the definition: NaN in, NaN out
    assert torch.equal(out[0, 0, 2], torch.zeros(8))  # torch's CPU kernel: zeros
    assert torch.isfinite(out).all()


# -- 6. interrupted writes leave nothing, and a later run cleans what a killed one left ---------------
def test_a_killed_writers_staging_directory_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "m.safetensors"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)  # a pid that has exited
    stale = tmp_path / atomic.stage_name(dest.name).replace(f"-{os.getpid()}-", f"-{dead}-")
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"x" * 1000)  # what safetensors leaves when killed
    alive = tmp_path / atomic.stage_name(dest.name)  # this process's: in use, kept
    alive.mkdir()
    save(dest, SPEC, PARAMS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, alive.name])


def test_safetensors_own_temporary_file_is_made_inside_the_staging_directory(tmp_path, monkeypatch):
    seen = []
    real = atomic._finish

    def look(tmp, mode):
        seen.extend(p.name for p in tmp_path.iterdir())
        real(tmp, mode)

    monkeypatch.setattr(atomic, "_finish", look)
    save(tmp_path / "m.safetensors", SPEC, PARAMS)
    assert all(atomic.is_staging(name) for name in seen) and seen
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_while_an_hf_export_is_published_leaves_the_new_files_together(tmp_path, monkeypatch):
    hf = write_hf(tmp_path / "hf", SPEC, PARAMS)
    other = synthetic_params(SPEC, 1)
    real_replace, calls = os.replace, []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == hf:  # publishing (not staging)
            calls.append(Path(dst).name)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the two renames

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupt)
    # Python's own Ctrl-C handler, as in a terminal: a suite started as a background job of a shell without job
    # control inherits SIGINT ignored, and an ignored Ctrl-C interrupts nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_hf(hf, SPEC, other, synthetic=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert calls == ["model.safetensors", "config.json"]
    loaded = load_checkpoint(hf)
    assert loaded.synthetic and np.array_equal(loaded.params["wte.weight"], other["wte.weight"])
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


def test_an_in_place_convert_keeps_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save(tmp_path / "m.safetensors", SPEC, PARAMS)
        assert cli.main(["convert", str(path), str(path), "--dtype", "bfloat16"]) == 0
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    finally:
        os.umask(previous)


# -- 8. artifacts: a checksum over content and labels, stored dtypes as recorded ----------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    if "torch" not in backends.available():
        pytest.skip("needs torch")
    out = tmp_path_factory.mktemp("art")
    case = Case("test-tiny", seed=0, batch=1, length=4)
    (rec,) = crossmachine.record([backends.get("torch")], [case], ["float32"], out)
    return rec.path


def rewrite(src: Path, dst: Path, edit) -> Path:
    """The artifact with `edit(tensors, metadata)` applied and its file written as safetensors does,
    the checksum left as recorded (or as `edit` sets it)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_an_untouched_artifact_reads(artifact):
    assert artifact_file.read(artifact).dtype == "float32"


def test_a_relabelled_dtype_is_caught(artifact, tmp_path):
    bad = rewrite(artifact, tmp_path / "a.safetensors", lambda t, m: m.update(dtype="bfloat16"))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        artifact_file.read(bad)


def test_a_one_ulp_edit_is_caught(artifact, tmp_path):
    def nudge(t, m):
        t["logits"] = t["logits"].copy()
        t["logits"].flat[0] = np.nextafter(t["logits"].flat[0], np.float32(np.inf))

    with pytest.raises(ArtifactError, match="does not match its checksum"):
        artifact_file.read(rewrite(artifact, tmp_path / "a.safetensors", nudge))


def test_a_tensor_stored_in_another_dtype_is_caught_even_with_a_fresh_checksum(artifact, tmp_path):
    def widen(t, m):
        t["logits"] = t["logits"].astype(np.float64)
        m["checksum"] = artifact_file.checksum(t, m)

    with pytest.raises(ArtifactError, match=r"wrong dtype: logits \(float64, expected float32\)"):
        artifact_file.read(rewrite(artifact, tmp_path / "a.safetensors", widen))


def test_an_artifact_without_a_checksum_names_the_re_record_command(artifact, tmp_path):
    def old(t, m):
        m.pop("checksum")
        m["format_version"] = "1"

    with pytest.raises(ArtifactError, match="re-record it with `gptspec conformance record"):
        artifact_file.read(rewrite(artifact, tmp_path / "a.safetensors", old))


def test_an_artifact_naming_a_bigger_preset_never_synthesizes_it(artifact, tmp_path, monkeypatch):
    def xl(t, m):
        fields = json.loads(m["case_fields"])
        m["case_fields"] = json.dumps(dict(fields, preset="gpt2-xl"))
        m["checksum"] = artifact_file.checksum(t, m)

    bad = rewrite(artifact, tmp_path / "a.safetensors", xl)
    monkeypatch.setattr(sys.modules["gptspec.conformance.cases"], "_checkpoint",
                        lambda *a: pytest.fail("compare synthesized the preset the artifact named"))
    result = crossmachine.compare([bad])
    assert any("builds a different model here" in note for note in result.notes)


def test_an_artifact_whose_model_spec_claims_more_than_its_gradients_is_refused(artifact, tmp_path):
    def big(t, m):
        m["model_spec"] = ModelSpec.preset("gpt2-xl").to_json()
        m["checksum"] = artifact_file.checksum(t, m)

    message = quickly(lambda: artifact_file.read(rewrite(artifact, tmp_path / "a.safetensors", big)))
    assert "(grads/): its ModelSpec (n_layer=48" in message and "claims 580 tensors, but the file holds 16" in message
