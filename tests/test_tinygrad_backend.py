"""What only the tinygrad backend has: load() gives a plain tinygrad model, tinygrad's dtypes (bfloat16
emulated where clang lacks it) and device names, its gradient API, and TinyJit, whose captured calls
must keep answering for fresh inputs, normalized weights and each cache. The contract every backend
keeps (errors, loading, variants) is tests/test_backend_contract.py.

Shapes and dtypes follow the conformance cases (test-tiny B3xT16, test-mini B2xT48) so that, in one
pytest run, the kernels tinygrad generated for those are reused here instead of generated again.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tinygrad")

from tinygrad import Device, Tensor, dtypes, nn  # noqa: E402
from tinygrad.helpers import EMULATED_DTYPES  # noqa: E402

from gptspec import backends  # noqa: E402
from gptspec.backends.tinygrad import BACKEND, GPT, KVCache, backend as tg  # noqa: E402
from gptspec.conformance.runner import perturb  # noqa: E402
from gptspec.spec import BackendError, InputError, ModelSpec, param_table, reference  # noqa: E402
from gptspec.spec.variants import get_variant  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
from gptspec.weights import round_to_dtype, save, synthetic_params  # noqa: E402

from helpers import assert_close, ids, rel_l2  # noqa: E402

MINI, TINY = ModelSpec.preset("test-mini"), ModelSpec.preset("test-tiny")
WHY = BACKEND.unavailable_reason()
needs_device = pytest.mark.skipif(WHY is not None, reason=f"tinygrad cannot run here: {WHY}")


def frozen(params):
    for a in params.values():  # as the conformance runner hands them over
        a.setflags(write=False)
    return params


@pytest.fixture(scope="module")
def mini_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "mini.safetensors"
    return save(path, MINI, synthetic_params(MINI, 0, "conformance"))


@pytest.fixture(scope="module")
def tiny():
    return BACKEND.build(TINY, synthetic_params(TINY, 0, "conformance"))


@needs_device
def test_load_gives_a_plain_tinygrad_model_with_canonical_names(mini_file):
    model = backends.load("tinygrad", mini_file)
    assert isinstance(model, GPT)
    state = nn.state.get_state_dict(model)
    assert list(state) == [p.name for p in param_table(MINI)]
    assert all(isinstance(t, Tensor) and t.dtype == dtypes.float32 for t in state.values())
    np.testing.assert_array_equal(state["h.1.mlp.c_fc.weight"].numpy(),
                                  synthetic_params(MINI, 0, "conformance")["h.1.mlp.c_fc.weight"])
    tokens = ids(MINI, (2, 48))
    logits = model(Tensor(tokens))
    assert isinstance(logits, Tensor) and logits.shape == (2, 48, MINI.vocab_size) and logits.dtype == dtypes.float32
    ref = reference.forward(MINI, synthetic_params(MINI, 0, "conformance"), tokens)
    assert rel_l2(logits.numpy(), ref) < bound("float32", "logits", "rel_l2")


@needs_device
@pytest.mark.parametrize("dtype, name", [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), (dtypes.float16, "float16"),
                                         ("float32", "float32")])
def test_dtype(mini_file, dtype, name):
    expected = {"bfloat16": dtypes.bfloat16, "float16": dtypes.float16, "float32": dtypes.float32}[name]
    model = backends.load("tinygrad", mini_file, dtype=dtype)
    state = nn.state.get_state_dict(model)
    assert {t.dtype for t in state.values()} == {expected}
    tokens = Tensor(ids(MINI, (2, 48)))
    assert model(tokens).dtype == expected
    loss = model.loss(tokens, Tensor(ids(MINI, (2, 48), seed=1)))
    assert loss.dtype == dtypes.float32 and loss.shape == ()


@needs_device
def test_bfloat16_runs_where_clang_has_no_bf16(mini_file):
    model = backends.load("tinygrad", mini_file, dtype="bfloat16")
    dev = model.wte.weight.device
    d = Device[dev]
    if type(d.renderer).__name__ == "ClangRenderer" and not tg._clang_has_bf16(tg.clang(), d.arch.split(",")[0]):
        assert "bfloat16" in EMULATED_DTYPES.value.split(",")  # clang 14: tinygrad's emulation, switched on for us
    tokens = ids(MINI, (2, 48))
    rounded = {n: round_to_dtype(a, "bfloat16") for n, a in synthetic_params(MINI, 0, "conformance").items()}
    ref = reference.forward(MINI, rounded, tokens)
    assert rel_l2(BACKEND.forward(model, tokens), ref) < bound("bfloat16", "logits", "rel_l2")


@needs_device
def test_loss_and_gradients_as_a_tinygrad_user_takes_them(tiny):
    tokens, targets = Tensor(ids(TINY, (3, 16))), ids(TINY, (3, 16), seed=1)
    targets[0, :5] = -100
    loss = tiny.loss(tokens, Tensor(targets))
    params = nn.state.get_parameters(tiny)
    grads = loss.gradient(*params)
    Tensor.realize(loss, *grads)
    ref = reference.loss_and_grads(TINY, synthetic_params(TINY, 0, "conformance"), tokens.numpy(), targets)
    assert abs(loss.item() - ref.loss) / ref.loss < bound("float32", "loss", "rel_l2")
    for name, g in zip(nn.state.get_state_dict(tiny), grads):
        assert rel_l2(g.numpy(), ref.grads[name]) < bound("float32", "grads", "rel_l2"), name


@needs_device
def test_jit_replays_give_fresh_answers(tiny):
    """TinyJit runs call 1 eagerly, captures call 2 and replays from call 3 on, reusing its output
    buffers: every call must still answer for its own inputs."""
    params = synthetic_params(TINY, 0, "conformance")
    for seed in range(4):
        tokens, targets = ids(TINY, (3, 16), seed=10 + seed), ids(TINY, (3, 16), seed=20 + seed)
        ref = reference.loss_and_grads(TINY, params, tokens, targets)
        assert rel_l2(BACKEND.forward(tiny, tokens), ref.logits) < bound("float32", "logits", "rel_l2"), seed
        got = BACKEND.loss_and_grads(tiny, tokens, targets)
        assert abs(got.loss - ref.loss) / ref.loss < bound("float32", "loss", "rel_l2"), seed
        assert rel_l2(got.logits, ref.logits) < bound("float32", "logits", "rel_l2"), seed
        assert rel_l2(got.grads["wte.weight"], ref.grads["wte.weight"]) < bound("float32", "grads", "rel_l2"), seed
    assert [j.cnt for j in tg._jits[tiny].values()] == [4, 4]  # both jits replayed


@needs_device
def test_one_pass_gives_the_loss_gradients_and_statistics_of_one_forward():
    """loss_and_grads(stats=True), the conformance runner's one pass: the residual statistics come from
    the loss's own forward, in one jit, and every answer is still the reference's."""
    params = synthetic_params(TINY, 0, "conformance")
    model = BACKEND.build(TINY, frozen(dict(params)))
    tokens, targets = ids(TINY, (3, 16), seed=30), ids(TINY, (3, 16), seed=31)
    got = BACKEND.loss_and_grads(model, tokens, targets, stats=True)
    ref = reference.loss_and_grads(TINY, params, tokens, targets)
    assert_close(got.logits, ref.logits, "logits", "logits")
    assert_close(got.loss, ref.loss, "loss", "loss")
    assert list(got.grads) == [p.name for p in param_table(TINY)]
    for name, g in got.grads.items():
        assert_close(g, ref.grads[name], "grads", name)
    want = reference.residual_stats(TINY, params, tokens)
    assert sorted(got.stats) == sorted(want)
    for name, value in want.items():
        assert_close(got.stats[name], value, "stats", f"residual {name}")
    assert list(tg._jits[model]) == [(tg._loss_grads_and_stats, (tokens.shape,))]  # no second forward


def test_beam_search_only_when_asked_and_only_inside_the_backends_calls(monkeypatch, tiny):
    from tinygrad.helpers import BEAM

    width_seen = tg.searched(lambda: BEAM.value)
    default = BEAM.value
    monkeypatch.delenv(tg.BEAM_VARIABLE, raising=False)
    assert tg.beam_width() == 0 and width_seen() == default  # off: tinygrad's own setting stands
    monkeypatch.setenv(tg.BEAM_VARIABLE, "2")
    assert width_seen() == 2 and BEAM.value == default
    monkeypatch.setenv(tg.BEAM_VARIABLE, "two")
    with pytest.raises(BackendError, match="GPTSPEC_TINYGRAD_BEAM must be a whole number >= 0.*got 'two'"):
        BACKEND.forward(tiny, ids(TINY, (3, 16)))  # the hooks read it, before any kernel runs


@pytest.mark.parametrize("name, expected", [("cpu", "CPU"), ("CPU", "CPU"), ("cuda", "CUDA"), ("cuda:0", "CUDA"),
                                            ("cuda:1", "CUDA:1"), ("NV", "NV"), ("metal", "METAL"), ("mps", "METAL")])
def test_device_names_map_onto_tinygrads(name, expected):
    assert tg.tinygrad_device(name) == expected


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "meta"])
def test_unknown_device_is_refused(name):
    with pytest.raises(BackendError, match="tinygrad has no device"):
        tg.tinygrad_device(name)


@needs_device
def test_default_device_is_tinygrads():
    assert tg.tinygrad_device(None) == Device.DEFAULT
    assert BACKEND.devices()[0] == Device.DEFAULT.lower()


@needs_device
def test_unusable_device_is_refused(mini_file):
    if tg.why_not("CUDA") is None:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(BackendError, match="tinygrad cannot use device 'cuda'"):
        backends.load("tinygrad", mini_file, device="cuda")


def test_without_clang_the_backend_says_what_to_install(monkeypatch, mini_file):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(tg.shutil, "which", lambda cmd, *a, **k: None)  # no clang on PATH
    assert "cpu" not in BACKEND.devices()
    with pytest.raises(BackendError, match="apt-get install clang"):
        BACKEND.build(TINY, synthetic_params(TINY), device="cpu")
    if BACKEND.devices():
        pytest.skip(f"a GPU keeps tinygrad usable without clang: {BACKEND.devices()}")
    assert "apt-get install clang" in BACKEND.unavailable_reason()
    assert "tinygrad" not in backends.available()  # so the conformance suite leaves it out
    assert "apt-get install clang" in backends.status()["tinygrad"]
    with pytest.raises(BackendError, match="installed but cannot run here.*apt-get install clang"):
        backends.load("tinygrad", mini_file)


def test_settings_tinygrad_refuses_leave_it_out_with_its_own_words():
    """tinygrad asserts on some old settings (CUDA=1: "use DEV=CUDA instead") wherever it picks its default
    device, so every tensor would fail: the backend is unavailable, in tinygrad's words, not a traceback."""
    import os
    import subprocess
    import sys

    code = ("from gptspec import backends; print(backends.available()); print(backends.status()['tinygrad'])")
    env = {k: v for k, v in os.environ.items() if k != "DEV"}  # DEV, when set, wins over the old variables
    done = subprocess.run([sys.executable, "-c", code], env={**env, "CUDA": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    available, why = done.stdout.splitlines()[-2:]
    assert "tinygrad" not in available
    assert "refuses its device settings" in why and "DEV=CUDA" in why


@pytest.mark.variant("ngpt")
@needs_device
def test_normalize_in_place_matches_the_reference_and_keeps_the_jit_fresh():
    spec = get_variant("ngpt").apply(TINY)
    params = synthetic_params(spec, 0, "conformance")
    off = frozen(perturb(spec, params, seed=0))  # every unit-norm matrix pushed off the sphere
    before = {n: a.copy() for n, a in off.items()}
    model = BACKEND.build(spec, off)
    tokens = ids(spec, (3, 16), seed=1)
    for _ in range(3):  # eager, capture, replay: the jit now holds the weights' buffers
        assert_close(BACKEND.forward(model, tokens), reference.forward(spec, off, tokens), "logits", "off-sphere")
    tensors = nn.state.get_state_dict(model)
    BACKEND.normalize(model)
    expected = reference.normalize_weights(spec, off)
    got = BACKEND.state(model)
    assert list(got) == [p.name for p in param_table(spec)]
    for p in param_table(spec):
        assert got[p.name].dtype == np.float32
        assert_close(got[p.name], expected[p.name], "weights", p.name)
        if p.unit_norm_axis is None:
            np.testing.assert_array_equal(got[p.name], off[p.name], err_msg=f"{p.name} is not normalized")
        else:
            np.testing.assert_allclose(np.linalg.norm(got[p.name], axis=p.unit_norm_axis), 1, rtol=1e-6)
        np.testing.assert_array_equal(off[p.name], before[p.name], err_msg=f"{p.name}: the caller's array changed")
        assert nn.state.get_state_dict(model)[p.name] is tensors[p.name]  # in place: same Tensors
    # the captured jit replays on the normalized weights, not on stale ones
    assert_close(BACKEND.forward(model, tokens), reference.forward(spec, expected, tokens), "logits", "normalized")
    assert tg._jits[model][(tg._logits, (tokens.shape,))].cnt == 4


def test_listed_in_the_registry():
    assert "tinygrad" in backends.names()
    if WHY is None:
        assert backends.get("tinygrad") is BACKEND and BACKEND.version().startswith("tinygrad ")


# -- the KV cache under TinyJit (SPEC.md 12; the cache's numbers for every backend: tests/test_kv_cache.py) ------
SPLITS = (5, 1, 1, 1, 3, 1, 1, 1, 2)  # a prefill, single tokens (TinyJit: eager, capture, replays), chunks


@needs_device
def test_decoding_steps_are_replayed_by_the_jit_and_stay_right(tiny):
    """Single-token steps run eagerly, are captured, then replayed: the replays must still answer for
    their own tokens and positions (test-tiny: the pieces fill its 16 positions)."""
    tokens = ids(TINY, (3, TINY.n_positions), seed=7)
    out, cache, start = [], None, 0
    for t in SPLITS:
        logits, cache = BACKEND.extend(tiny, tokens[:, start:start + t], cache)
        out.append(logits)
        start += t
    assert cache.offset == TINY.n_positions
    want = reference.forward(TINY, synthetic_params(TINY, 0, "conformance"), tokens)
    assert_close(np.concatenate(out, axis=1), want, "logits", "cached")
    assert tg._jits[tiny][(tg._extend, ((3, 1),))].cnt >= 3  # the single tokens were replayed


@needs_device
def test_the_tinygrad_cache_api(tiny):
    """What a tinygrad user calls: model(tokens, cache) with a KVCache of a fixed batch, last_only for sampling."""
    tokens = ids(TINY, (2, 11), seed=10)
    want = reference.forward(TINY, synthetic_params(TINY, 0, "conformance"), tokens)
    cache = KVCache(TINY, batch=2)
    first = tiny(Tensor(tokens[:, :7]), cache)
    assert cache.offset == 7 and first.shape == (2, 7, TINY.padded_vocab_size)
    last = tiny(Tensor(tokens[:, 7:]), cache, last_only=True)
    assert last.shape == (2, 1, TINY.padded_vocab_size) and cache.offset == 11
    assert_close(first.numpy(), want[:, :7], "logits", "prefill")
    assert_close(last.numpy()[:, 0], want[:, -1], "logits", "last_only")
    with pytest.raises(InputError, match="tokens have 3 rows, the cache holds 2"):  # its batch is fixed
        BACKEND.extend(tiny, ids(TINY, (3, 1)), cache)


# -- training (backends/tinygrad/train.py); the contract every backend keeps is tests/test_training.py --
@needs_device
def test_float32_power_is_the_optimizers_running_product():
    """A resumed optimizer's b1_t, b2_t come from float32_power (load_moments): it must equal the float32
    running product `b_t *= b` that tinygrad's own step leaves, or a resume is not bitwise."""
    from gptspec.backends.tinygrad.train import configure_optimizer, float32_power
    from gptspec.spec import TrainSpec

    from helpers import master_weights

    optimizer = configure_optimizer(BACKEND.build(TINY, master_weights(TINY)), TrainSpec(betas=(0.9, 0.95)))
    opt = optimizer.optimizers[0]
    for step in range(1, 4):
        opt.b1_t *= opt.b1
        opt.b2_t *= opt.b2
        assert opt.b1_t.numpy()[0] == float32_power(opt.b1, step)
        assert opt.b2_t.numpy()[0] == float32_power(opt.b2, step)
