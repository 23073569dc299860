"""What only the MLX backend has: load() gives an mlx.nn.Module, MLX dtypes and devices, mx.compile,
its float32-accurate cross-entropy and sink attention, no TF32, and the BLAS it loads. The contract
every backend keeps (errors, loading, variants) is tests/test_backend_contract.py."""
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
from gptspec.backends.mlx import cross_entropy  # noqa: E402
from gptspec.backends.mlx.attention import learned_sink_attention  # noqa: E402
from gptspec.spec import BackendError, ModelSpec, param_table, reference  # noqa: E402
from gptspec.spec.reference import ops  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
from gptspec.spec.variants import get_variant  # noqa: E402
from gptspec.weights import save, synthetic_params  # noqa: E402

from helpers import rel_l2  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

SPEC = ModelSpec.preset("test-mini")
PARAMS = synthetic_params(SPEC, 0, "conformance")


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


@pytest.mark.parametrize("dtype, expected", [("bfloat16", mx.bfloat16), ("bf16", mx.bfloat16),
                                             (mx.float16, mx.float16), ("float32", mx.float32)])
def test_dtype(weights_file, dtype, expected):
    m = load("mlx", weights_file, dtype=dtype)
    assert {p.dtype for _, p in tree_flatten(m.parameters())} == {expected}
    assert m(mx.zeros((1, 4), dtype=mx.int32)).dtype == expected


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


@pytest.mark.parametrize("variant", ["gpt2", "learned_sinks", "ngpt-seed"])
def test_compiled_model_gives_the_same_logits(variant):
    spec = get_variant(variant).apply(SPEC)
    model = get("mlx").build(spec, synthetic_params(spec, 0, "conformance"))
    tokens = mx.array(np.random.default_rng(4).integers(0, spec.vocab_size, (2, 12)))
    assert mx.allclose(mx.compile(model)(tokens), model(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["gpt2", "ngpt-seed"])
def test_an_id_out_of_range_gives_nan_under_mx_compile_too(variant):
    """SPEC.md 6 (tests/test_backend_contract.py has the plain call): mx.compile traces the embedding's
    NaN for ids outside [0, vocab_size), so a compiled model cannot return logits for them either."""
    spec = get_variant(variant).apply(SPEC)
    compiled = mx.compile(get("mlx").build(spec, synthetic_params(spec, 0, "conformance")))
    for bad in (spec.vocab_size, -1):
        assert np.isnan(np.array(compiled(mx.array([[1, 2, bad, 3]])))[0, 2]).all()
    assert np.isfinite(np.array(compiled(mx.array([[1, 2, 4, 3]])))).all()


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


# -- the sink attention's own vjp (SPEC.md 10), against the float64 reference's operator ---------------
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


# -- training (backends/mlx/train.py); the contract every backend keeps is tests/test_training.py ------
def test_the_global_norm_is_accurate_on_gpt2_token_embedding_shapes():
    """MLX's one-reduction sum (optim.clip_grad_norm's) adds one term at a time on the CPU: 9.6% low
    over 50257 x 768 squares. train.global_norm sums in two levels of ~sqrt(n) terms, so its worst
    case is 2 sqrt(n) u relative (each level a running sum of sqrt(n) positive terms)."""
    import mlx.optimizers as optim

    from gptspec.backends.mlx.train import global_norm

    g = np.random.default_rng(0).standard_normal((50257, 768), dtype=np.float32) * np.float32(1e-3)
    wide = g.reshape(-1).astype(np.float64)
    exact = float(np.sqrt(np.dot(wide, wide)))
    bound_ = 2 * np.sqrt(g.size) * 2.0 ** -24
    assert abs(global_norm({"wte": mx.array(g)}).item() / exact - 1) <= bound_
    _, mlx_norm = optim.clip_grad_norm({"wte": mx.array(g)}, 1.0)
    assert abs(mlx_norm.item() / exact - 1) > 10 * bound_  # why train.py does not use it
