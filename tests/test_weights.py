"""The weight format: canonical files, Hugging Face import/export, resolution, synthetic weights."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gptspec.spec import ModelSpec, WeightsError, param_table
from gptspec.weights import (
    ENV_VAR, Checkpoint, load_checkpoint, read, read_hf, round_to_dtype, save, synthetic_params, write_hf,
    write_synthetic,
)
from gptspec.weights.format import from_bfloat16_bits, to_bfloat16_bits, write_safetensors

SPEC = ModelSpec.preset("test-mini")


@pytest.fixture(scope="module")
def params():
    return synthetic_params(SPEC, 5, "conformance")


# -- canonical files ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_canonical_round_trip(tmp_path, params, dtype):
    path = save(tmp_path / "m.safetensors", SPEC, params, dtype, synthetic=True, origin="test")
    ckpt = read(path)
    assert ckpt.spec == SPEC and ckpt.stored_dtype == dtype and ckpt.synthetic
    assert list(ckpt.params) == [p.name for p in param_table(SPEC)]
    for name, value in params.items():
        np.testing.assert_array_equal(ckpt.params[name].astype(np.float32), round_to_dtype(value, dtype).astype(np.float32))
    assert ckpt.metadata["spec_version"] == "1" and json.loads(ckpt.metadata["model_spec"])["n_embd"] == 64


def test_bfloat16_rounds_to_nearest_even():
    # bit patterns chosen around the rounding boundaries of bfloat16 (7 stored mantissa bits)
    x = np.array([1.0, 1.00390625, 1.01171875, 1.0078125, -3.0, 65504.0, 1e-40, np.inf, -np.inf], np.float32)
    expected = np.array([1.0, 1.0, 1.015625, 1.0078125, -3.0, 65536.0, 1e-40, np.inf, -np.inf], np.float32)
    got = from_bfloat16_bits(to_bfloat16_bits(x))
    np.testing.assert_array_equal(got[:6], expected[:6])
    assert np.isinf(got[7]) and np.isinf(got[8]) and abs(got[6] - 1e-40) < 1e-41
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan], np.float32))))[0]


def test_bfloat16_matches_torch(params):
    torch = pytest.importorskip("torch")
    x = params["h.0.mlp.c_fc.weight"]
    np.testing.assert_array_equal(round_to_dtype(x, "bfloat16"), torch.from_numpy(x).bfloat16().float().numpy())


def test_tied_head_is_stored_once(tmp_path, params):
    from safetensors import safe_open

    save(tmp_path / "m.safetensors", SPEC, params)
    with safe_open(str(tmp_path / "m.safetensors"), "numpy") as f:
        assert "lm_head.weight" not in f.keys() and "wte.weight" in f.keys()


def test_refuses_to_save_a_wrong_state(tmp_path, params):
    bad = dict(params)
    del bad["ln_f.bias"]
    bad["h.0.ln_1.weight"] = np.ones(65, np.float32)
    bad["extra"] = np.ones(1, np.float32)
    with pytest.raises(WeightsError) as e:
        save(tmp_path / "m.safetensors", SPEC, bad)
    msg = str(e.value)
    assert "missing 1 tensor(s): ln_f.bias" in msg
    assert "unexpected 1 tensor(s): extra" in msg
    assert "h.0.ln_1.weight: expected (64,), got (65,)" in msg
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_the_old_file_intact(tmp_path, params):
    path = save(tmp_path / "m.safetensors", SPEC, params)
    before = path.read_bytes()
    broken = dict(params)
    broken["wte.weight"] = params["wte.weight"].copy()
    broken["wte.weight"][0, 0] = np.nan
    with pytest.raises(WeightsError, match="'wte.weight' holds NaN"):
        save(path, SPEC, broken)
    big = dict(params)
    big["wpe.weight"] = params["wpe.weight"] * 1e6
    with pytest.raises(WeightsError, match="beyond float16's range"):
        save(path, SPEC, big, "float16")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_truncated_file_is_named(tmp_path, params):
    path = save(tmp_path / "m.safetensors", SPEC, params)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=rf"{path}: not a readable safetensors file"):
        load_checkpoint(path)


def test_corrupt_header_is_named(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors file"):
        load_checkpoint(path)


def test_misshapen_file_is_named(tmp_path, params):
    tensors = dict(params)
    tensors["h.1.mlp.c_fc.weight"] = np.zeros((64, 256), np.float32)
    meta = {"model_spec": SPEC.to_json(), "spec_version": "1"}
    write_safetensors(tmp_path / "m.safetensors", tensors, "float32", meta)
    with pytest.raises(WeightsError, match=r"h.1.mlp.c_fc.weight: expected \(256, 64\), got \(64, 256\)"):
        read(tmp_path / "m.safetensors")


def test_foreign_files_are_explained(tmp_path, params):
    write_safetensors(tmp_path / "x.safetensors", params, "float32", {"spec_version": "1"})
    with pytest.raises(WeightsError, match="not a gptspec file"):
        read(tmp_path / "x.safetensors")
    write_safetensors(tmp_path / "v.safetensors", params, "float32", {"model_spec": SPEC.to_json(), "spec_version": "99"})
    with pytest.raises(WeightsError, match="spec version 99"):
        read(tmp_path / "v.safetensors")
    write_safetensors(tmp_path / "s.safetensors", params, "float32",
                      {"model_spec": '{"n_embd": 65, "n_head": 4}', "spec_version": "1"})
    with pytest.raises(WeightsError, match="model_spec metadata is invalid.*divisible"):
        read(tmp_path / "s.safetensors")


def test_integer_tensors_are_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"wte.weight": np.zeros((2, 2), np.int32)}, str(tmp_path / "i.safetensors"), {"model_spec": "{}"})
    with pytest.raises(WeightsError, match=r"wte.weight \(I32\)"):
        read(tmp_path / "i.safetensors")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")


# -- Hugging Face layout ------------------------------------------------------------------
def _hf_state(params, prefix="transformer."):
    return {prefix + p.name: (params[p.name].T.copy() if p.hf_transposed else params[p.name]) for p in param_table(SPEC)}


def _write_hf_dir(path, tensors, config=None):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {
        "model_type": "gpt2", "vocab_size": 257, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}))
    return path


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_import_with_buffers_and_head(tmp_path, params, prefix):
    tensors = _hf_state(params, prefix)
    for i in range(SPEC.n_layer):  # old checkpoints carry the causal-mask buffers
        tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = params["wte.weight"]
    ckpt = load_checkpoint(_write_hf_dir(tmp_path / "hf", tensors))
    assert ckpt.spec == SPEC and not ckpt.synthetic
    for name, value in params.items():
        np.testing.assert_array_equal(ckpt.params[name], value)


def test_hf_file_path_finds_its_config(tmp_path, params):
    d = _write_hf_dir(tmp_path / "hf", _hf_state(params))
    ckpt = load_checkpoint(d / "model.safetensors")
    np.testing.assert_array_equal(ckpt.params["h.0.attn.c_attn.weight"], params["h.0.attn.c_attn.weight"])


def test_hf_untied_head_is_refused(tmp_path, params):
    tensors = _hf_state(params)
    tensors["lm_head.weight"] = params["wte.weight"] + 1
    with pytest.raises(WeightsError, match="lm_head.weight differs from wte.weight"):
        load_checkpoint(_write_hf_dir(tmp_path / "hf", tensors))


def test_hf_untransposed_conv1d_is_refused(tmp_path, params):
    # canonical (out, in) layout written where HF expects (in, out): the non-square ones mismatch
    tensors = {"transformer." + n: v for n, v in params.items()}
    with pytest.raises(WeightsError, match=r"h.0.attn.c_attn.weight: expected \(64, 192\), got \(192, 64\)"):
        load_checkpoint(_write_hf_dir(tmp_path / "hf", tensors))


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu"}, "activation_function 'gelu' is not GPT-2's tanh GELU"),
    ({"n_inner": 100}, "n_inner 100 is not 4 \\* n_embd"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"n_head": 5}, "divisible"),
])
def test_hf_config_outside_the_spec_is_refused(tmp_path, params, change, message):
    config = {"model_type": "gpt2", "vocab_size": 257, "n_positions": 64, "n_embd": 64, "n_layer": 2,
              "n_head": 4} | change
    with pytest.raises(WeightsError, match=message):
        load_checkpoint(_write_hf_dir(tmp_path / "hf", _hf_state(params), config))


def test_hf_missing_config_is_explained(tmp_path, params):
    d = _write_hf_dir(tmp_path / "hf", _hf_state(params))
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        read_hf(d / "model.safetensors")


def test_hf_pytorch_bin_is_read_weights_only(tmp_path, params):
    torch = pytest.importorskip("torch")
    d = tmp_path / "bin"
    _write_hf_dir(d, _hf_state(params))
    (d / "model.safetensors").unlink()
    state = {k: torch.from_numpy(v).bfloat16() for k, v in _hf_state(params).items()}
    torch.save(state, d / "pytorch_model.bin")
    ckpt = load_checkpoint(d)
    assert ckpt.stored_dtype == "float32"  # bfloat16 widened exactly
    np.testing.assert_array_equal(ckpt.params["wpe.weight"], round_to_dtype(params["wpe.weight"], "bfloat16"))


def test_hf_pickle_with_code_is_refused(tmp_path, params):
    torch = pytest.importorskip("torch")
    d = _write_hf_dir(tmp_path / "evil", _hf_state(params))
    (d / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"wte.weight": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="cannot be read as a weights-only torch file"):
        load_checkpoint(d)
    assert not (tmp_path / "pwned").exists()


def test_hf_sharded_checkpoint(tmp_path, params):
    from safetensors.numpy import save_file

    tensors = _hf_state(params)
    d = _write_hf_dir(tmp_path / "sharded", {})
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / file), {"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    ckpt = load_checkpoint(d)
    np.testing.assert_array_equal(ckpt.params["h.1.mlp.c_proj.weight"], params["h.1.mlp.c_proj.weight"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_export_round_trip(tmp_path, params, dtype):
    write_hf(tmp_path / "out", SPEC, params, dtype)
    ckpt = load_checkpoint(tmp_path / "out")
    for name, value in params.items():
        np.testing.assert_array_equal(ckpt.params[name], round_to_dtype(value, dtype))


def test_transformers_loads_our_export(tmp_path, params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_hf(tmp_path / "out", SPEC, params)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["transformer.h.0.attn.c_attn.weight"].numpy(), params["h.0.attn.c_attn.weight"].T)
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])


# -- synthetic weights ----------------------------------------------------------------------
def test_synthetic_is_deterministic_and_per_tensor():
    a = synthetic_params(SPEC, 1)
    b = synthetic_params(SPEC, 1)
    c = synthetic_params(SPEC.replace(n_layer=3), 1)  # another model: shared tensors unchanged
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(a["h.1.mlp.c_fc.weight"], c["h.1.mlp.c_fc.weight"])
    assert not np.array_equal(a["wte.weight"], synthetic_params(SPEC, 2)["wte.weight"])


def test_synthetic_gpt2_init_statistics():
    spec = ModelSpec(vocab_size=1000, n_positions=128, n_embd=256, n_layer=8, n_head=4)
    p = synthetic_params(spec, 0, "gpt2")
    assert abs(p["wte.weight"].std() - 0.02) < 0.0005
    assert abs(p["h.2.attn.c_proj.weight"].std() - 0.02 / 4) < 0.0002  # 0.02 / sqrt(2 * 8)
    assert abs(p["h.2.mlp.c_proj.weight"].std() - 0.02 / 4) < 0.0002
    assert abs(p["h.2.mlp.c_fc.weight"].std() - 0.02) < 0.0005
    assert not p["h.2.mlp.c_fc.bias"].any() and (p["ln_f.weight"] == 1).all() and not p["ln_f.bias"].any()


def test_synthetic_checkpoint_is_marked_everywhere(tmp_path):
    write_synthetic(tmp_path / "s", SPEC, seed=2)
    ckpt = load_checkpoint(tmp_path / "s")
    assert ckpt.synthetic and "SYNTHETIC" in ckpt.describe()
    assert json.loads((tmp_path / "s" / "config.json").read_text())["gptspec_synthetic"] is True
    assert load_checkpoint("synthetic:test-mini:2").synthetic


# -- resolution -------------------------------------------------------------------------------
@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_not_found_says_where_it_looked(no_weights):
    with pytest.raises(WeightsError) as e:
        load_checkpoint("gpt2")
    msg = str(e.value)
    assert "no weights found for 'gpt2'" in msg and "$GPTSPEC_WEIGHTS: unset" in msg
    assert str(no_weights / "hub" / "models--gpt2") in msg and "models--openai-community--gpt2" in msg
    assert "synthetic:gpt2" in msg and "GPTSPEC_WEIGHTS" in msg


def test_env_var_directory(no_weights, monkeypatch, params):
    d = no_weights / "weights"
    save(d / "test-mini.safetensors", SPEC, params)
    monkeypatch.setenv(ENV_VAR, str(d))
    assert load_checkpoint("test-mini").source == str(d / "test-mini.safetensors")
    write_hf(d / "other", SPEC, params)
    assert load_checkpoint("other").source.endswith("other/model.safetensors")


def test_hugging_face_cache_snapshot(no_weights, params):
    repo = no_weights / "hub" / "models--openai-community--gpt2"
    write_hf(repo / "snapshots" / "abc123", SPEC, params)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    ckpt = load_checkpoint("gpt2")
    assert "abc123" in ckpt.source and ckpt.spec == SPEC
    assert load_checkpoint("openai-community/gpt2").source == ckpt.source


def test_synthetic_names_are_checked():
    with pytest.raises(WeightsError, match="synthetic:<preset>"):
        load_checkpoint("synthetic:gpt5")
    with pytest.raises(WeightsError, match="seed must be a non-negative integer"):
        load_checkpoint("synthetic:test-tiny:x")


def test_checkpoint_passes_through():
    ckpt = Checkpoint(spec=SPEC, params=synthetic_params(SPEC))
    assert load_checkpoint(ckpt) is ckpt
