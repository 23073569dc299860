"""The tinygrad backend as a tinygrad user meets it: load(), a plain tinygrad model, clear errors,
and every variant (sinks, nGPT, seed 002's) against the float64 reference.

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
from gptspec.backends.generation import generate  # noqa: E402
from gptspec.backends.tinygrad import BACKEND, GPT, NGPT, KVCache, backend as tg  # noqa: E402
from gptspec.conformance.cases import exit_draws  # noqa: E402
from gptspec.conformance.generation import ReferenceBackend, judge_against_reference  # noqa: E402
from gptspec.conformance.metrics import errors  # noqa: E402
from gptspec.conformance.runner import perturb  # noqa: E402
from gptspec.spec import OPTIONS, BackendError, InputError, ModelSpec, param_table, reference  # noqa: E402
from gptspec.spec.sampling import Sampling  # noqa: E402
from gptspec.spec.variants import get_variant  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
from gptspec.weights import round_to_dtype, save, synthetic_params, write_synthetic  # noqa: E402

MINI, TINY = ModelSpec.preset("test-mini"), ModelSpec.preset("test-tiny")
TINY2 = TINY.replace(n_layer=2)  # seed 002's variants: shared blocks and the layer losses need two layers
WHY = BACKEND.unavailable_reason()
needs_device = pytest.mark.skipif(WHY is not None, reason=f"tinygrad cannot run here: {WHY}")


def ids(spec, shape, seed=0):
    return np.random.default_rng(seed).integers(0, spec.vocab_size, shape)


def rel_l2(x, ref):
    return errors(x, ref)[0]


def frozen(params):
    for a in params.values():  # as the conformance runner hands them over
        a.setflags(write=False)
    return params


def assert_close(x, ref, quantity, what, dtype="float32"):
    rel_l2_, rel_max, _ = errors(x, ref)
    assert rel_l2_ < bound(dtype, quantity, "rel_l2") and rel_max < bound(dtype, quantity, "rel_max"), \
        f"{what}: rel_l2 {rel_l2_:.3g}, rel_max {rel_max:.3g}"


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
def test_hugging_face_directory(tmp_path):
    write_synthetic(tmp_path, TINY, seed=3, init="conformance")
    model = backends.load("tinygrad", tmp_path)
    params = synthetic_params(TINY, 3, "conformance")
    for name, t in nn.state.get_state_dict(model).items():  # Conv1D weights transposed back to (out, in)
        np.testing.assert_array_equal(t.numpy(), params[name], err_msg=name)
    tokens = ids(TINY, (3, 16), seed=1)
    ref = reference.forward(TINY, params, tokens)
    assert rel_l2(BACKEND.forward(model, tokens), ref) < bound("float32", "logits", "rel_l2")


@needs_device
def test_transformers_checkpoint_gives_transformers_logits(tmp_path):
    """External oracle: GPT2LMHeadModel.save_pretrained, with transformers' own init, read by
    load("tinygrad", path), gives transformers' own logits."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so that dropping one would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path)
    tokens = ids(TINY, (3, 16), seed=2)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    mine = BACKEND.forward(backends.load("tinygrad", tmp_path), tokens)
    assert rel_l2(mine, theirs) < bound("float32", "logits", "rel_l2", pairwise=True)


@needs_device
@pytest.mark.parametrize("dtype, name", [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), (dtypes.float16, "float16"),
                                         ("float32", "float32")])
def test_dtype(mini_file, dtype, name):
    expected = {"bfloat16": dtypes.bfloat16, "float16": dtypes.float16, "float32": dtypes.float32}[name]
    model = backends.load("tinygrad", mini_file, dtype=dtype)
    state = nn.state.get_state_dict(model)
    assert {t.dtype for t in state.values()} == {expected}
    # rounded to nearest even on the way in, exactly as the reference rounds
    w = synthetic_params(MINI, 0, "conformance")["wte.weight"]
    np.testing.assert_array_equal(state["wte.weight"].float().numpy(), round_to_dtype(w, name).astype(np.float32))
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
@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_unsupported_dtype_is_refused(mini_file, dtype):
    with pytest.raises(BackendError, match="dtype|cannot run"):
        backends.load("tinygrad", mini_file, dtype=dtype)


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


@needs_device
@pytest.mark.parametrize("tokens, message", [
    (np.array([[1, 257]]), "holds id 257, outside the vocabulary \\[0, 257\\)"),
    (np.array([[-1, 2]]), "holds id -1"),
    (np.zeros((1, 65), np.int64), "T=65, longer than the context length n_positions=64"),
    (np.zeros((1, 4), np.float32), "integer"),
    (np.zeros(4, np.int64), "shape \\(B, T\\)"),
])
def test_bad_tokens_are_named(mini_file, tokens, message):
    model = backends.load("tinygrad", mini_file)
    with pytest.raises(InputError, match=message):
        model(Tensor(tokens))
    with pytest.raises(InputError, match=message):
        BACKEND.forward(model, tokens)


@needs_device
def test_bad_targets_are_named(mini_file):
    model = backends.load("tinygrad", mini_file)
    tokens = np.zeros((2, 4), np.int64)
    for targets, message in [(np.zeros((2, 5), np.int64), "targets must have the shape of tokens"),
                             (np.full((2, 4), 300), "targets hold id 300"),
                             (np.full((2, 4), -100), "every target equals the ignore index"),
                             (np.zeros((2, 4), np.float32), "targets must be an integer array")]:
        with pytest.raises(InputError, match=message):
            model.loss(Tensor(tokens), Tensor(targets))
        with pytest.raises(InputError, match=message):
            BACKEND.loss_and_grads(model, tokens, targets)


@needs_device
def test_own_init_follows_the_spec():
    Tensor.manual_seed(0)
    spec = ModelSpec(vocab_size=1000, n_positions=64, n_embd=256, n_layer=8, n_head=4)
    sd = nn.state.get_state_dict(GPT(spec))
    assert abs(sd["wte.weight"].numpy().std() - 0.02) < 5e-4
    assert abs(sd["h.1.attn.c_proj.weight"].numpy().std() - 0.005) < 2e-4  # 0.02 / sqrt(16)
    assert not sd["h.1.attn.c_attn.bias"].numpy().any() and (sd["ln_f.weight"].numpy() == 1).all()


# -- variants (SPEC.md 10, 11, 16-19): test-tiny at the conformance shape B3xT16, so kernels are shared ----
VARIANTS = ["softmax1", "softmax_c", "learned_sinks", "ngpt", "ngpt-nope", "ngpt-seed"]
SEED002 = ["shared-blocks", "parallel", "multiplicative", "normed-residual", "escape-normed", "escape-residual",
           "no-value", "no-value-sum", "all-layer-loss", "all-layer-loss-local", "early-exit", "padded-vocab",
           "seed002-axm"]


def small(name):
    return get_variant(name).apply(TINY2 if name in SEED002 else TINY)


def test_implements_every_option():
    assert BACKEND.implements == OPTIONS
    for name in VARIANTS + SEED002:
        assert BACKEND.unsupported(small(name)) is None


# seed 002's variants meet the reference in the conformance suite (test-mini, every dtype); here only
# the tinygrad-specific paths: the draws API, padded rows, generation with a cache
@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    spec = small(request.param)
    params = frozen(synthetic_params(spec, 0, "conformance"))
    return spec, params, BACKEND.build(spec, params)


@needs_device
def test_variant_matches_the_float64_reference(variant):
    spec, params, model = variant
    assert type(model) is (NGPT if spec.architecture == "ngpt" else GPT)
    assert list(nn.state.get_state_dict(model)) == [p.name for p in param_table(spec)]
    tokens, targets = ids(spec, (3, 16), seed=1), ids(spec, (3, 16), seed=2)
    targets[1, :4] = -100
    draws = exit_draws(spec, params, tokens, seed=0)  # None but for loss="early_exit"
    ref = reference.loss_and_grads(spec, params, tokens, targets, draws)
    assert_close(BACKEND.forward(model, tokens), ref.logits, "logits", "forward")
    got = BACKEND.loss_and_grads(model, tokens, targets, draws)
    assert_close(got.logits, ref.logits, "logits", "logits")
    assert_close(np.float64(got.loss), np.float64(ref.loss), "loss", "loss")
    assert list(got.grads) == list(ref.grads)  # every parameter, canonical names (sinks, nGPT scales)
    for name, g in got.grads.items():
        assert g.shape == ref.grads[name].shape and g.dtype == np.float32, name
        assert_close(g, ref.grads[name], "grads", name)
    if spec.architecture == "gpt2":
        stats, want = BACKEND.residual_stats(model, tokens), reference.residual_stats(spec, params, tokens)
        assert list(stats) == list(want)
        for name, x in stats.items():
            assert x.shape == (spec.n_layer,) and x.dtype == np.float64, name
            assert_close(x, want[name], "stats", f"residual {name}")


@needs_device
def test_padded_vocabulary_rows_get_no_gradient_and_no_probability():
    """SPEC.md 19: logits are padded_vocab_size wide, the loss sees the first vocab_size only."""
    spec = get_variant("padded-vocab").apply(TINY2).replace(loss="all_layers")
    params = synthetic_params(spec, 0, "conformance")
    model = BACKEND.build(spec, params)
    tokens, targets = ids(spec, (3, 16), seed=1), ids(spec, (3, 16), seed=2)
    got = BACKEND.loss_and_grads(model, tokens, targets)
    assert spec.padded_vocab_size == 64 > spec.vocab_size and got.logits.shape == (3, 16, 64)
    assert not got.grads["wte.weight"][spec.vocab_size:].any()  # exactly zero
    ref = reference.loss_and_grads(spec, params, tokens, targets)
    assert_close(np.float64(got.loss), np.float64(ref.loss), "loss", "loss")


@needs_device
def test_early_exit_takes_its_draws_as_a_tinygrad_user_passes_them():
    spec = get_variant("early-exit").apply(TINY2)
    params = synthetic_params(spec, 0, "conformance")
    model = BACKEND.build(spec, params)
    tokens, targets = ids(spec, (3, 16), seed=1), ids(spec, (3, 16), seed=2)
    draws = exit_draws(spec, params, tokens, seed=0)
    loss = model.loss(Tensor(tokens), Tensor(targets), Tensor(draws.astype(np.float32)))
    ref = reference.loss_and_grads(spec, params, tokens, targets, draws)
    assert loss.dtype == dtypes.float32 and abs(loss.item() - ref.loss) / ref.loss < bound("float32", "loss", "rel_l2")
    with pytest.raises(InputError, match="needs its draws"):
        model.loss(Tensor(tokens), Tensor(targets))
    with pytest.raises(InputError, match="shape"):
        BACKEND.loss_and_grads(model, tokens, targets, draws[:1])
    with pytest.raises(InputError, match="early_exit"):  # the other losses take none
        BACKEND.loss_and_grads(BACKEND.build(TINY, synthetic_params(TINY)), tokens, targets, draws)


def test_sink_variants_differ_from_softmax():
    """The reference tells the sinks apart; so must the backend (a sink silently dropped would not)."""
    base = synthetic_params(TINY, 0, "conformance")
    tokens = ids(TINY, (3, 16), seed=1)
    softmax = reference.forward(TINY, base, tokens)
    for name in ("softmax1", "softmax_c", "learned_sinks"):
        spec = get_variant(name).apply(TINY)
        ref = reference.forward(spec, synthetic_params(spec, 0, "conformance"), tokens)
        assert rel_l2(ref, softmax) > 10 * bound("float32", "logits", "rel_l2"), name  # softmax_c: ~40x


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


@needs_device
def test_own_ngpt_init_is_unit_norm_with_scales_at_their_init():
    spec = get_variant("ngpt-seed").apply(TINY)
    Tensor.manual_seed(0)
    sd = {n: t.numpy() for n, t in nn.state.get_state_dict(NGPT(spec)).items()}
    for p in param_table(spec):
        if p.unit_norm_axis is not None:
            np.testing.assert_allclose(np.linalg.norm(sd[p.name], axis=p.unit_norm_axis), 1, rtol=1e-6, err_msg=p.name)
        else:
            assert np.all(sd[p.name] == sd[p.name].flat[0]), p.name
    assert sd["sz"][0] == np.float32(1 / TINY.n_embd)  # ngpt_scale="inv_d": stored init 1/d


@needs_device
@pytest.mark.parametrize("name", ["ngpt-seed", "learned_sinks"])
def test_load_rebuilds_the_variant_from_its_checkpoint(tmp_path, name):
    spec = get_variant(name).apply(TINY)
    params = synthetic_params(spec, 4, "conformance")
    model = backends.load("tinygrad", save(tmp_path / f"{name}.safetensors", spec, params, synthetic=True))
    assert model.spec == spec and type(model) is (NGPT if spec.architecture == "ngpt" else GPT)
    state = nn.state.get_state_dict(model)
    assert list(state) == [p.name for p in param_table(spec)]
    for n, t in state.items():
        np.testing.assert_array_equal(t.numpy(), params[n], err_msg=n)
    tokens = ids(spec, (3, 16), seed=5)
    assert_close(BACKEND.forward(model, tokens), reference.forward(spec, params, tokens), "logits", name)


def test_listed_in_the_registry():
    assert "tinygrad" in backends.names()
    if WHY is None:
        assert backends.get("tinygrad") is BACKEND and BACKEND.version().startswith("tinygrad ")


# -- generation with a KV cache (SPEC.md 12): test-tiny, whose 16 positions the pieces fill --------------
CACHED = ["gpt2", "learned_sinks", "ngpt", "seed002-axm", "padded-vocab"]  # axm: a shared block, identity values
SPLITS = (5, 1, 1, 1, 3, 1, 1, 1, 2)  # a prefill, single tokens (TinyJit: eager, capture, replays), chunks


@pytest.fixture(scope="module", params=CACHED)
def cached(request):
    spec = small(request.param)
    params = frozen(synthetic_params(spec, 0, "conformance"))
    return spec, params, BACKEND.build(spec, params)


def in_pieces(model, tokens, splits=SPLITS, cache=None):
    out, start = [], 0
    for t in splits:
        logits, cache = BACKEND.extend(model, tokens[:, start:start + t], cache)
        assert logits.shape == (len(tokens), t, model.spec.padded_vocab_size) and logits.dtype == np.float32
        out.append(logits)
        start += t
    return np.concatenate(out, axis=1), cache


@needs_device
def test_cached_logits_equal_the_whole_sequence(cached):
    """Each piece at the positions after the cache's: learned positions (GPT-2) and RoPE (nGPT) from
    there, the mask of a chunk aligned bottom-right, the sinks in every row; so the pieces' logits are
    the logits of the whole sequence in one (float64 reference) forward."""
    spec, params, model = cached
    assert sum(SPLITS) == spec.n_positions
    tokens = ids(spec, (3, spec.n_positions), seed=7)
    got, cache = in_pieces(model, tokens)
    assert cache.offset == spec.n_positions
    assert_close(got, reference.forward(spec, params, tokens), "logits", f"{spec.attention}/{spec.architecture}")
    assert tg._jits[model][(tg._extend, ((3, 1),))].cnt >= 3  # the single tokens were replayed, and checked


@needs_device
def test_a_replayed_step_uses_the_cache_it_is_given(cached):
    """Two caches of one batch size, extended in turns: the decoding TinyJit takes the cache as an
    input, so neither sees the other's keys (a cache captured in the jit would be shared)."""
    spec, params, model = cached
    a, b = ids(spec, (3, 12), seed=8), ids(spec, (3, 12), seed=9)
    (la, ca), (lb, cb) = BACKEND.extend(model, a[:, :6], None), BACKEND.extend(model, b[:, :6], None)
    got_a, got_b = [la], [lb]
    for i in range(6, 12):
        la, ca = BACKEND.extend(model, a[:, i:i + 1], ca)
        lb, cb = BACKEND.extend(model, b[:, i:i + 1], cb)
        got_a.append(la)
        got_b.append(lb)
    assert_close(np.concatenate(got_a, 1), reference.forward(spec, params, a), "logits", "cache a")
    assert_close(np.concatenate(got_b, 1), reference.forward(spec, params, b), "logits", "cache b")


@needs_device
def test_last_only_and_the_tinygrad_api(cached):
    """What a tinygrad user calls: model(tokens, cache), with last_only for sampling."""
    spec, params, model = cached
    tokens = ids(spec, (2, 11), seed=10)
    want = reference.forward(spec, params, tokens)
    cache = KVCache(spec, batch=2)
    first = model(Tensor(tokens[:, :7]), cache)
    assert cache.offset == 7 and first.shape == (2, 7, spec.padded_vocab_size)
    last = model(Tensor(tokens[:, 7:]), cache, last_only=True)
    assert last.shape == (2, 1, spec.padded_vocab_size) and cache.offset == 11
    assert_close(first.numpy(), want[:, :7], "logits", "prefill")
    assert_close(last.numpy()[:, 0], want[:, -1], "logits", "last_only")
    through_backend, _ = BACKEND.extend(model, tokens[:, 7:], BACKEND.extend(model, tokens[:, :7], None)[1], last_only=True)
    assert through_backend.shape == (2, 1, spec.padded_vocab_size)
    assert_close(through_backend[:, 0], want[:, -1], "logits", "extend last_only")


@needs_device
def test_greedy_generation_equals_the_references(cached):
    """backends/generation.py on the cache against the same loop on the float64 reference (no cache):
    prompts of three lengths share one cache, the longest runs into the end of the context. Token for
    token, except after a near-tie of the reference (conformance/generation.py's rule)."""
    spec, params, _ = cached
    if spec.architecture == "gpt2":  # as tests/test_kv_cache.py: a small wte, so the tied head does not echo the input
        params = frozen(dict(params, **{"wte.weight": params["wte.weight"] * np.float32(0.1)}))
    prompts, new = ([3, 14, 15], [9, 2, 6, 5, 35, 8], [7]), 12
    want = generate(ReferenceBackend(spec, params), None, spec, prompts, new, Sampling(temperature=0), stop=None)
    got = generate(BACKEND, BACKEND.build(spec, params), spec, prompts, new, Sampling(temperature=0), stop=None)
    assert want.stopped == ["max_new_tokens", "context", "max_new_tokens"] and got.stopped == want.stopped
    assert len(set(want.new[2])) > 2  # the continuation depends on the context, not one id repeated
    for prompt, w, g in zip(prompts, want.new, got.new):
        verdict = judge_against_reference(spec, params, prompt, w, g, "float32")
        assert verdict.ok, f"prompt of {len(prompt)}: {verdict}"


@needs_device
def test_the_cache_cannot_pass_the_context(cached):
    spec, _, model = cached
    logits, cache = BACKEND.extend(model, ids(spec, (2, spec.n_positions - 2)), None)
    with pytest.raises(InputError, match=f"3 tokens after the {spec.n_positions - 2} in the cache pass the "
                                         f"context length n_positions={spec.n_positions}"):
        BACKEND.extend(model, ids(spec, (2, 3)), cache)
    assert cache.offset == spec.n_positions - 2  # refused, not half-written
    with pytest.raises(InputError, match="rows"):
        BACKEND.extend(model, ids(spec, (3, 1)), cache)
    _, cache = BACKEND.extend(model, ids(spec, (2, 2)), cache)  # exactly full is allowed
    with pytest.raises(InputError, match="n_positions"):
        BACKEND.extend(model, ids(spec, (2, 1)), cache)
    with pytest.raises(InputError, match="n_positions"):
        model(Tensor(ids(spec, (2, 1))), cache)
    with pytest.raises(InputError, match="outside the vocabulary"):
        BACKEND.extend(model, np.full((2, 1), spec.vocab_size), None)
