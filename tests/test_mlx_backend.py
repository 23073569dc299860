"""The MLX backend as an MLX user meets it: load(), an mlx.nn.Module, clear errors, a fast BLAS."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx")

from gptspec.backends import get, load  # noqa: E402
from gptspec.backends.mlx import blas  # noqa: E402  (loads the BLAS before mlx.core, as in use)
from gptspec.backends.mlx import backend as mlx_backend  # noqa: E402
from gptspec.backends.mlx import GPT, NGPT, cross_entropy  # noqa: E402
from gptspec.backends.mlx.model import learned_sink_attention  # noqa: E402
from gptspec.spec import OPTIONS, BackendError, InputError, ModelSpec, param_table, reference  # noqa: E402
from gptspec.spec.params import init_law  # noqa: E402
from gptspec.spec.reference import ops  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
from gptspec.spec.variants import VARIANTS, get_variant  # noqa: E402
from gptspec.weights import round_to_dtype, save, synthetic_params, write_hf, write_synthetic  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

SPEC = ModelSpec.preset("test-mini")
PARAMS = synthetic_params(SPEC, 0, "conformance")


def rel_l2(x, ref) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return save(tmp_path_factory.mktemp("w") / "mini.safetensors", SPEC, PARAMS)


@pytest.fixture(scope="module")
def model(weights_file):
    return load("mlx", weights_file)


def test_load_gives_an_mlx_module_with_canonical_names(model):
    assert isinstance(model, nn.Module) and not model.training
    assert [n for n, _ in tree_flatten(model.parameters())] == [p.name for p in param_table(SPEC)]
    logits = model(mx.random.randint(0, SPEC.vocab_size, (3, 10)))
    assert isinstance(logits, mx.array) and logits.shape == (3, 10, SPEC.vocab_size)
    assert logits.dtype == mx.float32


def test_logits_and_loss_match_the_reference(model):
    tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (2, 30))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = -100
    ref = reference.loss_and_grads(SPEC, {n: a.astype(np.float64) for n, a in PARAMS.items()}, tokens, targets)
    logits = np.array(model(mx.array(tokens)))
    assert rel_l2(logits, ref.logits) < bound("float32", "logits", "rel_l2")
    loss = model.loss(mx.array(tokens), mx.array(targets)).item()
    assert abs(loss - ref.loss) / abs(ref.loss) < bound("float32", "loss", "rel_l2")


def test_hugging_face_directory_gives_the_same_model(tmp_path, model):
    write_hf(tmp_path / "hf", SPEC, PARAMS)
    write_synthetic(tmp_path / "synthetic", SPEC, seed=0, init="conformance")
    tokens = mx.array(np.random.default_rng(1).integers(0, SPEC.vocab_size, (2, 20)))
    for directory in ("hf", "synthetic"):
        from_hf = load("mlx", tmp_path / directory)
        assert mx.array_equal(from_hf(tokens), model(tokens)), directory


@pytest.mark.parametrize("dtype, expected", [("bfloat16", mx.bfloat16), ("bf16", mx.bfloat16),
                                             (mx.float16, mx.float16), ("float32", mx.float32)])
def test_dtype(weights_file, dtype, expected):
    m = load("mlx", weights_file, dtype=dtype)
    assert {p.dtype for _, p in tree_flatten(m.parameters())} == {expected}
    assert m(mx.zeros((1, 4), dtype=mx.int32)).dtype == expected


def test_weights_are_rounded_to_nearest_even(weights_file):
    m = load("mlx", weights_file, dtype="bfloat16")
    held = np.array(m.wte.weight.astype(mx.float32))
    assert np.array_equal(held, round_to_dtype(PARAMS["wte.weight"], "bfloat16"))


def test_loss_is_float32_and_gradients_reach_every_parameter(weights_file):
    m = load("mlx", weights_file, dtype="bfloat16")
    tokens = mx.random.randint(0, SPEC.vocab_size, (2, 8))
    loss, grads = nn.value_and_grad(m, m.loss)(tokens, mx.roll(tokens, -1, axis=1))
    assert loss.dtype == mx.float32 and loss.ndim == 0
    assert [n for n, _ in tree_flatten(grads)] == [p.name for p in param_table(SPEC)]
    assert all(mx.any(g != 0).item() for n, g in tree_flatten(grads) if not n.startswith("wpe"))


def test_cross_entropy_skips_the_ignore_index_and_is_float32():
    logits = mx.array(np.random.default_rng(2).standard_normal((2, 3, 5)), dtype=mx.float16)
    targets = np.array([[1, -100, 4], [0, 2, -100]])
    x = np.array(logits.astype(mx.float32)).astype(np.float64)
    counted = targets != -100
    expected = np.mean(np.log(np.exp(x).sum(-1))[counted] - x[counted, targets[counted]])
    loss = cross_entropy(logits, mx.array(targets))
    assert loss.dtype == mx.float32 and abs(loss.item() - expected) < 1e-6


def test_loss_is_accurate_over_gpt2s_vocabulary():
    """MLX's CPU sums add one term at a time: plain float32 sums over 50257 logits and 64 tokens put
    the loss up to 2.4e-7 off here (torch's: 3e-8). The blocked sum and the shifted mean must not."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(4):
        logits = (rng.standard_normal((64, 50257)) * 2).astype(np.float32)
        targets = rng.integers(0, 50257, 64)
        x = logits.astype(np.float64)
        peak = x.max(-1)
        exact = np.mean(np.log(np.exp(x - peak[:, None]).sum(-1)) + peak - x[np.arange(64), targets])
        loss = cross_entropy(mx.array(logits), mx.array(targets)).item()
        worst = max(worst, abs(loss - exact) / exact)
    assert worst < 1e-7, worst


def test_compiled_model_gives_the_same_logits(model):
    tokens = mx.array(np.random.default_rng(4).integers(0, SPEC.vocab_size, (2, 12)))
    assert mx.allclose(mx.compile(model)(tokens), model(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_unsupported_dtype_is_refused(weights_file, dtype):
    with pytest.raises(BackendError, match="dtype|cannot run"):
        load("mlx", weights_file, dtype=dtype)


def test_unavailable_device_is_refused(weights_file):
    if not mx.is_available(mx.gpu):
        with pytest.raises(BackendError, match="no GPU"):
            load("mlx", weights_file, device="gpu")
    with pytest.raises(BackendError, match="cpu or gpu"):
        load("mlx", weights_file, device="meta")
    with pytest.raises(BackendError, match="only 1 cpu"):
        load("mlx", weights_file, device="cpu:1")


def test_device_is_where_it_computes(weights_file):
    m = load("mlx", weights_file, device="cpu")
    assert m.device == mx.cpu
    assert get("mlx").devices()[0] == ("gpu" if mx.default_device() == mx.gpu else "cpu")


@pytest.mark.parametrize("tokens, message", [
    (mx.array([[1, 257]]), "holds id 257, outside the vocabulary \\[0, 257\\)"),
    (mx.array([[-1, 2]]), "holds id -1"),
    (mx.zeros((1, 65), dtype=mx.int32), "T=65, longer than the context length n_positions=64"),
    (mx.zeros((1, 4)), "integer"),
    (mx.zeros((4,), dtype=mx.int32), "shape \\(B, T\\)"),
])
def test_bad_tokens_are_named(model, tokens, message):
    with pytest.raises(InputError, match=message):
        model(tokens)


def test_bad_targets_are_named(model):
    tokens = mx.zeros((2, 4), dtype=mx.int32)
    with pytest.raises(InputError, match="targets must have the shape of tokens"):
        model.loss(tokens, mx.zeros((2, 5), dtype=mx.int32))
    with pytest.raises(InputError, match="targets hold id 300"):
        model.loss(tokens, mx.full((2, 4), 300))
    with pytest.raises(InputError, match="every target equals the ignore index"):
        model.loss(tokens, mx.full((2, 4), -100))
    with pytest.raises(InputError, match="targets must be an integer array"):
        model.loss(tokens, mx.zeros((2, 4)))


def test_adapter_checks_numpy_inputs_too(model):
    backend = get("mlx")
    with pytest.raises(InputError, match="holds id 300"):
        backend.forward(model, np.full((1, 3), 300))
    with pytest.raises(InputError, match="every target equals the ignore index"):
        backend.loss_and_grads(model, np.zeros((1, 3), np.int64), np.full((1, 3), -100))


def test_own_init_follows_the_spec():
    mx.random.seed(0)
    spec = ModelSpec(vocab_size=1000, n_positions=64, n_embd=256, n_layer=8, n_head=4)
    params = dict(tree_flatten(GPT(spec).parameters()))
    assert abs(np.std(np.array(params["wte.weight"])) - 0.02) < 5e-4
    assert abs(np.std(np.array(params["h.1.attn.c_proj.weight"])) - 0.005) < 2e-4  # 0.02 / sqrt(16)
    assert not mx.any(params["h.1.attn.c_attn.bias"]).item() and mx.all(params["ln_f.weight"] == 1).item()


def test_synthetic_name_loads():
    assert load("mlx", "synthetic:test-tiny:3").spec == ModelSpec.preset("test-tiny")


# -- full-precision float32 (no TF32) ----------------------------------------------------
def test_float32_matmuls_are_ieee_here():
    assert "MLX_ENABLE_TF32" in os.environ  # set (to 0) on import unless the user chose
    assert not mlx_backend._tf32_matmuls(mx.default_device())


def test_tf32_is_refused_for_float32_conformance(model, monkeypatch):
    monkeypatch.setattr(mlx_backend, "_tf32_matmuls", lambda device: True)
    with pytest.raises(BackendError, match="MLX_ENABLE_TF32=0"):
        get("mlx").forward(model, np.zeros((1, 3), np.int64))


# -- the BLAS loader -----------------------------------------------------------------------
FOUND = ["/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/venv/lib/libmkl_rt.so.2"]


@pytest.mark.parametrize("setting", [None, "", "auto", "AUTO"])
def test_blas_plan_loads_what_it_found_on_linux(setting):
    plan = blas.plan(setting, "linux", False, FOUND)
    assert plan.paths == tuple(FOUND) and not plan.explicit and not plan.warn


@pytest.mark.parametrize("setting", ["off", "OFF", "0", "false", "none"])
def test_blas_plan_off_keeps_the_bundled_blas_quietly(setting):
    plan = blas.plan(setting, "linux", False, FOUND)
    assert plan.paths == () and not plan.warn and "bundled" in plan.reason


def test_blas_plan_path_override():
    plan = blas.plan(" /opt/blas/libblis.so ", "linux", False, FOUND)
    assert plan.paths == ("/opt/blas/libblis.so",) and plan.explicit


@pytest.mark.parametrize("setting", [None, "auto", "/opt/blas/libopenblas.so"])
def test_blas_plan_never_on_macos_or_windows(setting):
    assert blas.plan(setting, "darwin", False, FOUND).paths == ()
    assert "Accelerate" in blas.plan(setting, "darwin", False, FOUND).reason
    assert blas.plan(setting, "win32", False, FOUND).paths == ()


def test_blas_plan_warns_when_too_late_or_nothing_found():
    late = blas.plan(None, "linux", True, FOUND)
    assert late.paths == () and late.warn and "before" in late.reason
    none = blas.plan(None, "linux", False, [])
    assert none.paths == () and none.warn and "libopenblas0-pthread" in none.reason


def test_blas_explicit_path_that_cannot_be_used_is_an_error(tmp_path):
    with pytest.raises(BackendError, match="GPTSPEC_MLX_BLAS=.*nothing.so"):
        blas.load(blas.Plan((str(tmp_path / "nothing.so"),), True, "test"))
    with pytest.raises(BackendError, match="does not export cblas_sgemm"):
        blas.load(blas.Plan(("libc.so.6",), True, "test"))  # a real library, but no BLAS


def test_blas_auto_skips_unusable_candidates(tmp_path, caplog):
    found = blas.find_optimised_blas()
    if not found:
        pytest.skip("no optimised BLAS on this machine (apt-get install libopenblas0-pthread)")
    chosen = blas.load(blas.Plan((str(tmp_path / "missing.so"), "libc.so.6", found[0]), False, "test"))
    assert found[0] in chosen
    assert blas.load(blas.Plan((str(tmp_path / "missing.so"),), False, "test")).startswith("MLX's bundled")


def _fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


_LOGGED = "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "


def test_blas_is_loaded_on_first_use_and_can_be_turned_off():
    plain = _fresh_python("import sys, gptspec, gptspec.backends; "
                          "assert 'mlx.core' not in sys.modules and 'mlx' not in sys.modules")
    assert plain.returncode == 0, plain.stderr
    off = _fresh_python(_LOGGED + "from gptspec.backends import get; get('mlx')", GPTSPEC_MLX_BLAS="off")
    assert off.returncode == 0 and "MLX uses MLX's bundled reference BLAS" in off.stderr, off.stderr
    if sys.platform.startswith("linux") and blas.find_optimised_blas():
        auto = _fresh_python(_LOGGED + "from gptspec.backends import get; get('mlx')", GPTSPEC_MLX_BLAS="auto")
        assert auto.returncode == 0 and "MLX uses BLAS " in auto.stderr, auto.stderr


def test_blas_warns_when_mlx_was_imported_first():
    if not sys.platform.startswith("linux"):
        pytest.skip("the loader only acts on Linux")
    late = _fresh_python(_LOGGED + "import mlx.core; import gptspec.backends.mlx", GPTSPEC_MLX_BLAS="auto")
    assert late.returncode == 0 and "too late" in late.stderr, late.stderr


# -- the variants (SPEC.md 10 and 11), always against the float64 reference ------------------------
VARIANT_NAMES = ["softmax1", "softmax_c", "learned_sinks", "ngpt", "ngpt-nope", "ngpt-seed"]


def variant(name: str):
    spec = get_variant(name).apply(SPEC)
    return spec, synthetic_params(spec, 0, "conformance")  # sinks and scale vectors away from their init


def test_mlx_implements_every_option_of_the_spec():
    backend = get("mlx")
    assert backend.implements == OPTIONS
    assert [n for n, v in VARIANTS.items() if backend.unsupported(v.apply(SPEC))] == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_logits_loss_and_grads_match_the_reference(name, dtype):
    spec, params = variant(name)
    tokens = np.random.default_rng(5).integers(0, spec.vocab_size, (2, 24))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = -100
    ref = reference.loss_and_grads(spec, {n: round_to_dtype(a, dtype) for n, a in params.items()}, tokens, targets)
    backend = get("mlx")
    model = backend.build(spec, params, dtype)
    assert isinstance(model, NGPT if spec.architecture == "ngpt" else GPT)
    got = backend.loss_and_grads(model, tokens, targets)
    assert rel_l2(got.logits, ref.logits) < bound(dtype, "logits", "rel_l2")
    assert abs(got.loss - ref.loss) / abs(ref.loss) < bound(dtype, "loss", "rel_l2")
    assert list(got.grads) == [p.name for p in param_table(spec)]  # sinks, sqk, suv, alphas, sz included
    for n, g in ref.grads.items():
        assert rel_l2(got.grads[n], g) < bound(dtype, "grads", "rel_l2"), n


@pytest.mark.parametrize("sinks", [[0.0, 0.0, 0.0], [-1.5, 0.3, 2.0], [-200.0, 200.0, 5.0]])
def test_learned_sink_attention_and_its_gradient_match_the_reference(sinks):
    """Sink logits far below and above the scores too: the stable form of SPEC.md 10."""
    rng = np.random.default_rng(6)
    q, k, v, dy = (rng.standard_normal((2, 3, 7, 8)) for _ in range(4))
    y_ref, cache = ops.causal_attention_forward(q, k, v, 8 ** -0.5, np.array(sinks))
    grads_ref = ops.causal_attention_backward(dy, cache)  # dq, dk, dv, d_sinks
    f32 = [mx.array(a.astype(np.float32)) for a in (q, k, v, np.array(sinks), dy)]
    (y,), grads = mx.vjp(learned_sink_attention(8 ** -0.5), f32[:4], f32[4:])
    assert rel_l2(y, y_ref) < 1e-6
    for got, expected in zip(grads, grads_ref):
        assert rel_l2(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ngpt_normalize_matches_the_reference_and_never_writes_the_callers_arrays(dtype):
    spec, params = variant("ngpt")
    rng = np.random.default_rng(7)
    off = {n: (a * rng.uniform(0.5, 2.0, a.shape)).astype(np.float32) for n, a in params.items()}
    given = {n: a.copy() for n, a in off.items()}
    backend = get("mlx")
    model = backend.build(spec, off, dtype)
    backend.normalize(model)
    got = backend.state(model)
    expected = reference.normalize_weights(spec, {n: round_to_dtype(a, dtype) for n, a in off.items()})
    for info in param_table(spec):
        assert rel_l2(got[info.name], expected[info.name]) < bound(dtype, "weights", "rel_l2"), info.name
        assert np.array_equal(off[info.name], given[info.name]), info.name
        if info.unit_norm_axis is None:  # scaling vectors are never normalized
            assert np.array_equal(got[info.name], round_to_dtype(off[info.name], dtype)), info.name


def test_normalize_leaves_gpt2_alone(model):
    before = get("mlx").state(model)
    get("mlx").normalize(model)
    assert all(np.array_equal(a, before[n]) for n, a in get("mlx").state(model).items())


def test_ngpt_own_init_follows_the_spec():
    spec = get_variant("ngpt").apply(SPEC)
    params = dict(tree_flatten(NGPT(spec).parameters()))
    assert list(params) == [p.name for p in param_table(spec)]
    for info in param_table(spec):
        w = np.array(params[info.name])
        if info.unit_norm_axis is not None:
            assert np.allclose(np.linalg.norm(w, axis=info.unit_norm_axis), 1, atol=1e-6), info.name
        else:
            assert np.all(w == np.float32(init_law(spec, info)[0])), info.name


@pytest.mark.parametrize("name", ["learned_sinks", "ngpt-seed"])
def test_load_rebuilds_the_variants_architecture(tmp_path, name):
    spec, params = variant(name)
    model = load("mlx", save(tmp_path / f"{name}.safetensors", spec, params, synthetic=True))
    assert model.spec == spec and isinstance(model, NGPT if name.startswith("ngpt") else GPT)
    assert [n for n, _ in tree_flatten(model.parameters())] == [p.name for p in param_table(spec)]
    tokens = np.random.default_rng(8).integers(0, spec.vocab_size, (2, 16))
    logits = model(mx.array(tokens))
    assert rel_l2(logits, reference.forward(spec, params, tokens)) < bound("float32", "logits", "rel_l2")
    assert mx.allclose(mx.compile(model)(mx.array(tokens)), logits, rtol=1e-5, atol=1e-6)


# -- seed 002's options (SPEC.md 16-19); the conformance suite runs the named variants ------------
@pytest.mark.parametrize("options", [
    dict(attention_values="identity", attention="learned_sinks"),
    dict(attention_values="identity", attention="softmax1", head_reduce="sum", blocks="shared"),
    dict(attention_values="identity", attention="softmax_c", softmax_c=3.0, block_form="parallel",
         parallel_attn_scale=0.5, loss="all_layers_local"),
])
def test_identity_values_with_sinks_match_the_reference_and_cache(options):
    """Combinations no named variant has: the plain-op attention with each sink, and its KV cache."""
    spec = SPEC.replace(**options)
    params = synthetic_params(spec, 0, "conformance")
    tokens = np.random.default_rng(9).integers(0, spec.vocab_size, (2, 20))
    targets = np.roll(tokens, -1, axis=1)
    ref = reference.loss_and_grads(spec, params, tokens, targets)
    backend = get("mlx")
    model = backend.build(spec, params)
    got = backend.loss_and_grads(model, tokens, targets)
    assert rel_l2(got.logits, ref.logits) < bound("float32", "logits", "rel_l2")
    assert abs(got.loss - ref.loss) / ref.loss < bound("float32", "loss", "rel_l2")
    for n, g in ref.grads.items():
        assert rel_l2(got.grads[n], g) < bound("float32", "grads", "rel_l2"), n
    cache, parts = None, []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        logits, cache = backend.extend(model, tokens[:, a:b], cache)
        parts.append(logits)
    assert rel_l2(np.concatenate(parts, axis=1), ref.logits) < bound("float32", "logits", "rel_l2")


def test_early_exit_loss_is_the_modules_loss_and_needs_its_draws():
    spec = get_variant("early-exit").apply(SPEC)
    params = synthetic_params(spec, 0, "conformance")
    tokens = np.random.default_rng(10).integers(0, spec.vocab_size, (2, 16))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = -100
    draws = np.random.default_rng(11).random((spec.n_layer, 2, 16)) ** 4
    backend = get("mlx")
    model = backend.build(spec, params)
    got = backend.loss_and_grads(model, tokens, targets, draws)
    loss, grads = nn.value_and_grad(model, lambda m: m.loss(mx.array(tokens), mx.array(targets), mx.array(draws)))(
        model)
    assert loss.item() == pytest.approx(got.loss, rel=1e-6)
    assert rel_l2(dict(tree_flatten(grads))["wte.weight"], got.grads["wte.weight"]) < 1e-6
    with pytest.raises(InputError, match="draws"):
        backend.loss_and_grads(model, tokens, targets)
    with pytest.raises(InputError, match="draws"):
        model.loss(mx.array(tokens), mx.array(targets), mx.array(draws[:1]))
    with pytest.raises(InputError, match="draws"):
        backend.loss_and_grads(backend.build(SPEC, PARAMS), tokens, targets, draws)


def test_padded_vocabulary_rows_get_exactly_zero_gradient():
    spec = get_variant("padded-vocab").apply(SPEC)
    params = synthetic_params(spec, 0, "conformance")
    tokens = np.random.default_rng(12).integers(0, spec.vocab_size, (2, 16))
    backend = get("mlx")
    got = backend.loss_and_grads(backend.build(spec, params), tokens, np.roll(tokens, -1, axis=1))
    assert got.logits.shape[-1] == spec.padded_vocab_size > spec.vocab_size
    assert not got.grads["wte.weight"][spec.vocab_size:].any()


def test_residual_stats_match_the_reference():
    spec = get_variant("seed002-axm").apply(SPEC)
    params = synthetic_params(spec, 0, "conformance")
    tokens = np.random.default_rng(13).integers(0, spec.vocab_size, (2, 16))
    got = get("mlx").residual_stats(get("mlx").build(spec, params), tokens)
    for name, expected in reference.residual_stats(spec, params, tokens).items():
        assert got[name].dtype == np.float64 and got[name].shape == (spec.n_layer,)
        assert rel_l2(got[name], expected) < bound("float32", "stats", "rel_l2"), name
