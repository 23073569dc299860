"""The backend contract (backends/base.py, SPEC.md 6), written once and run on every installed backend:
the clear errors of bad input, of an option a backend does not implement and of an operation an
architecture does not define; loading (names, files, Hugging Face's own checkpoints), the own
initialization, the residual statistics, the nGPT normalization, the early-exit draws, the padded
vocabulary and the plain-op attention, against the float64 reference.

Where the checks happen (SPEC.md 6): the Backend methods and `generate` check everything on numpy,
so out-of-range ids, targets and draws are tested through them; the native model call checks only
what costs no device sync (rank, integer dtype, length, cache room), tested through it too.
The numbers of every variant in every dtype are the conformance suite's (tests/test_conformance.py);
the KV cache is tests/test_kv_cache.py's; what one framework alone has stays in its own file.
"""
from __future__ import annotations

import copy
from functools import lru_cache

import numpy as np
import pytest

from helpers import (
    NGPT_VARIANTS, assert_close, from_native, ids, native, native_class, rel_l2, seed_framework, variant_spec,
)

from gptspec import backends
from gptspec.backends.generation import generate
from gptspec.conformance.cases import exit_draws
from gptspec.conformance.runner import perturb
from gptspec.spec import (
    OPTIONS, BackendError, InputError, ModelSpec, SpecError, WeightsError, param_table, reference,
)
from gptspec.spec.params import init_law
from gptspec.spec.tolerance import bound
from gptspec.weights import round_to_dtype, save, synthetic_params, write_synthetic

MINI = ModelSpec.preset("test-mini")  # vocab 257, n_positions 64
TINY = ModelSpec.preset("test-tiny")


@lru_cache(maxsize=None)
def weights(variant: str = "gpt2"):
    spec = variant_spec(variant, MINI)
    params = synthetic_params(spec, 0, "conformance")
    for a in params.values():  # read-only, as the conformance runner hands them over: a backend must copy
        a.setflags(write=False)
    return spec, params


def built(backend, variant: str = "gpt2", dtype: str = "float32"):
    spec, params = weights(variant)
    return spec, params, backend.build(spec, params, dtype)


# -- bad input: the same error from every backend ------------------------------------------------------
BAD_TOKENS = [
    pytest.param(np.array([[1, 257]]), "holds id 257, outside the vocabulary \\[0, 257\\)", id="id-past-vocab"),
    pytest.param(np.array([[-1, 2]]), "holds id -1, outside the vocabulary", id="negative-id"),
    pytest.param(np.zeros((1, 65), np.int64), "T=65, longer than the context length n_positions=64", id="too-long"),
    pytest.param(np.zeros((1, 4), np.float32), "must be an integer array", id="float"),
    pytest.param(np.zeros(4, np.int64), "must have shape \\(B, T\\)", id="rank-1"),
]


@pytest.mark.parametrize("method", ["forward", "loss_and_grads", "extend", "residual_stats"])
@pytest.mark.parametrize("tokens, message", BAD_TOKENS)
def test_bad_tokens_are_named_by_every_backend_method(backend, method, tokens, message):
    _, _, model = built(backend)
    targets = np.zeros(np.shape(tokens), np.int64)
    args = {"loss_and_grads": (targets,), "extend": (None,)}.get(method, ())
    with pytest.raises(InputError, match=message):
        getattr(backend, method)(model, tokens, *args)


@pytest.mark.parametrize("tokens, message", [p for p in BAD_TOKENS if p.id in ("too-long", "float", "rank-1")])
def test_the_native_model_names_shape_dtype_and_length(backend, tokens, message):
    """What the model itself checks (no device sync): rank, integer dtype, length. Ids are checked
    where they enter, by the Backend methods (above) and generate (below)."""
    _, _, model = built(backend)
    with pytest.raises(InputError, match=message):
        model(native(backend.name, tokens))


@pytest.mark.parametrize("variant, bad", [("gpt2", "vocab_size"), ("gpt2", "padded"), ("gpt2", -1),
                                          ("ngpt-seed", "vocab_size"), ("ngpt-seed", -1)])
def test_the_native_model_turns_an_id_out_of_range_into_nan(backend, variant, bad):
    """SPEC.md 6: the native call cannot raise on a value without a device sync (nor at all under
    mx.compile or TinyJit), and a gather out of range gives plausible logits (a padded row, tinygrad's
    zero row), so the embedding makes the ids outside [0, vocab_size) NaN; valid ids keep their logits."""
    spec = variant_spec(variant, TINY.replace(vocab_multiple=64) if variant == "gpt2" else TINY)
    model = backend.build(spec, synthetic_params(spec, 0, "conformance"))
    bad_id = {"vocab_size": spec.vocab_size, "padded": spec.padded_vocab_size - 1}.get(bad, bad)
    logits = from_native(backend.name, model(native(backend.name, np.array([[1, 2, bad_id, 3]]))))
    assert np.isnan(logits[0, 2]).all()
    good = from_native(backend.name, model(native(backend.name, np.array([[1, 2, 4, 3]]))))
    assert np.isfinite(good).all()


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "uint8", "uint16", "uint32", "uint64"])
def test_the_native_model_takes_every_integer_dtype(backend, dtype):
    """SPEC.md 6: any integer dtype is an integer array; each framework gathers with its own index type."""
    spec, _, model = built(backend)
    tokens = ids(spec, (2, 5)) % 127  # fits int8
    want = backend.forward(model, tokens.astype(np.int64))
    got = from_native(backend.name, model(native(backend.name, tokens.astype(dtype))))
    np.testing.assert_array_equal(got[..., :spec.vocab_size], want)


def test_the_native_model_refuses_tokens_past_its_cache(backend):
    spec, _, model = built(backend)
    _, cache = backend.extend(model, ids(spec, (2, spec.n_positions - 2)), None)
    with pytest.raises(InputError, match=f"3 tokens after the {spec.n_positions - 2} in the cache pass the "
                                         f"context length n_positions={spec.n_positions}"):
        model(native(backend.name, ids(spec, (2, 3))), cache=cache)
    with pytest.raises(InputError, match="outside the vocabulary"):  # the id check at the boundary, with a cache
        backend.extend(model, np.full((2, 1), spec.vocab_size), cache)


@pytest.mark.parametrize("targets, message", [
    pytest.param(np.zeros((2, 5), np.int64), "targets must have the shape of tokens \\(2, 4\\), got \\(2, 5\\)",
                 id="shape"),
    pytest.param(np.full((2, 4), 300), "targets hold id 300, neither in \\[0, 257\\)", id="id-past-vocab"),
    pytest.param(np.full((2, 4), -5), "targets hold id -5", id="negative-id"),
    pytest.param(np.full((2, 4), -100), "every target equals the ignore index -100", id="all-ignored"),
    pytest.param(np.zeros((2, 4), np.float32), "targets must be an integer array", id="float"),
])
def test_bad_targets_are_named(backend, targets, message):
    _, _, model = built(backend)
    with pytest.raises(InputError, match=message):
        backend.loss_and_grads(model, np.zeros((2, 4), np.int64), targets)


@pytest.mark.variant("early-exit")
@pytest.mark.parametrize("draws, message", [
    pytest.param(None, "loss='early_exit' needs its draws u: an array of shape \\(2, 2, 4\\)", id="missing"),
    pytest.param(np.zeros((1, 2, 4)), "draws must have shape \\(n_layer, B, T\\) = \\(2, 2, 4\\), got \\(1, 2, 4\\)",
                 id="shape"),
    pytest.param(np.ones((2, 2, 4)), "draws must lie in \\[0, 1\\)", id="one"),
    pytest.param(np.full((2, 2, 4), np.nan), "draws must lie in \\[0, 1\\)", id="nan"),
    pytest.param(np.zeros((2, 2, 4), np.int64), "draws must be a floating-point array", id="integer"),
])
def test_bad_draws_are_named(backend, draws, message):
    _, _, model = built(backend, "early-exit")
    tokens = np.zeros((2, 4), np.int64)
    with pytest.raises(InputError, match=message):
        backend.loss_and_grads(model, tokens, tokens, draws)


def test_draws_for_a_loss_without_them_are_refused(backend):
    _, _, model = built(backend)
    tokens = np.zeros((2, 4), np.int64)
    with pytest.raises(InputError, match="draws are an input of loss='early_exit' only; this model's loss is 'final'"):
        backend.loss_and_grads(model, tokens, tokens, np.zeros((2, 2, 4)))


@pytest.mark.variant("early-exit")
def test_the_native_early_exit_loss_needs_its_draws(backend):
    _, _, model = built(backend, "early-exit")
    tokens = native(backend.name, np.zeros((2, 4), np.int64))
    with pytest.raises(InputError, match="needs its draws"):
        model.loss(tokens, tokens)


@pytest.mark.parametrize("prompts, message", [
    pytest.param([[1, 2], [3, 257]], "prompt 1 has ids outside \\[0, 257\\): \\[257\\]", id="id-past-vocab"),
    pytest.param([[-1]], "prompt 0 has ids outside \\[0, 257\\): \\[-1\\]", id="negative-id"),
    pytest.param([list(range(64))], "prompt 0 has 64 tokens; the context holds 64", id="no-room"),
])
def test_generate_names_bad_prompts(backend, prompts, message):
    spec, _, model = built(backend)
    with pytest.raises(InputError, match=message):
        generate(backend, model, spec, prompts, 3)


# -- what is not defined, and what a backend does not implement -------------------------------------------
@pytest.mark.parametrize("variant", NGPT_VARIANTS)
def test_residual_stats_of_ngpt_are_not_defined(backend, variant):
    """SPEC.md 18.4 defines them for GPT-2's pre-norm residual stream only: a SpecError, as the reference's."""
    spec, params, model = built(backend, variant)
    tokens = ids(spec, (1, 4))
    with pytest.raises(SpecError, match="residual_stats are defined for architecture='gpt2'"):
        reference.residual_stats(spec, params, tokens)
    with pytest.raises(SpecError, match="residual_stats are defined for architecture='gpt2'"):
        backend.residual_stats(model, tokens)


def test_the_table_claims_only_values_of_the_spec(backend):
    for option, values in backend.implements.items():
        assert option in OPTIONS, f"{backend.name} claims an option the spec does not have: {option!r}"
        assert set(values) <= set(OPTIONS[option]), f"{backend.name} claims {option} values {values}"


def test_an_option_missing_from_the_table_is_implemented_nowhere(backend):
    narrow = copy.copy(backend)
    narrow.implements = {k: v for k, v in backend.implements.items() if k != "norm"}
    assert narrow.unsupported(MINI).startswith(f"{backend.name} does not implement norm='layernorm'")


def without(backend, option: str, value):
    """A copy of `backend` whose `implements` table lacks option=value, as a backend before it is ported."""
    narrow = copy.copy(backend)
    narrow.implements = {**backend.implements, option: tuple(v for v in backend.implements[option] if v != value)}
    return narrow


@pytest.mark.variant("softmax1")
def test_an_option_the_backend_does_not_implement_is_named(backend, tmp_path):
    spec, params = weights("softmax1")
    narrow = without(backend, "attention", "softmax1")
    message = f"{backend.name} does not implement attention='softmax1'"
    assert narrow.unsupported(spec).startswith(message)
    assert narrow.unsupported(MINI) is None
    with pytest.raises(BackendError, match=message):
        narrow.build(spec, params)
    with pytest.raises(BackendError, match=message):
        narrow.load(save(tmp_path / "softmax1.safetensors", spec, params, synthetic=True))


@pytest.mark.variant("learned_sinks")
def test_a_model_lacking_a_table_parameter_is_named_with_where_to_add_it(backend):
    """The port that claims an option before its model holds the option's parameters (issue 11: a
    bare KeyError 'h.0.attn.q_norm.weight'): the error names the backend, the parameters and the file."""
    spec, params = weights("learned_sinks")
    plain = backend.models["gpt2"]
    narrow = copy.copy(backend)
    narrow.models = {**backend.models, "gpt2": lambda s, *a, **k: plain(s.replace(attention="softmax"), *a, **k)}
    with pytest.raises(BackendError) as refused:
        narrow.build(spec, params)
    message = str(refused.value)
    for named in (backend.name, "h.0.attn.sinks", "h.1.attn.sinks", f"backends/{backend.name}/", "model.py"):
        assert named in message, (named, message)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_a_dtype_outside_the_spec_is_refused(backend, dtype):
    spec, params = weights()
    with pytest.raises(BackendError, match=f"unknown dtype '{dtype}'; the spec defines float32, bfloat16, float16"):
        backend.build(spec, params, dtype)


def test_an_unknown_device_is_refused(backend):
    spec, params = weights()
    with pytest.raises(BackendError, match="'meta'"):
        backend.build(spec, params, device="meta")


def test_weights_that_do_not_fit_the_table_are_named(backend):
    spec, params = weights()
    misshapen = dict(params, **{"h.1.mlp.c_fc.bias": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"h\.1\.mlp\.c_fc\.bias: expected \(256,\), got \(3,\)"):
        backend.build(spec, misshapen)
    missing = {n: a for n, a in params.items() if n != "ln_f.bias"}
    with pytest.raises(WeightsError, match="missing 1 tensor\\(s\\): ln_f.bias"):
        backend.build(spec, missing)


# -- loading -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_are_rounded_to_nearest_even(backend, dtype):
    """SPEC.md 7: a low-precision model holds the weights rounded as the reference rounds them."""
    if dtype not in backend.dtypes(backend.devices()[0]):
        pytest.skip(f"{backend.name} does not run {dtype} on {backend.devices()[0]}")
    spec, params, model = built(backend, dtype=dtype)
    state = backend.state(model)
    for name, w in params.items():
        np.testing.assert_array_equal(state[name], round_to_dtype(w, dtype).astype(np.float32), err_msg=name)


def test_a_synthetic_name_loads_its_weights_exactly(backend):
    model = backends.load(backend.name, "synthetic:test-tiny:3")
    assert model.spec == TINY
    state, want = backend.state(model), synthetic_params(TINY, 3, "gpt2")  # a name gives GPT-2's init
    assert sorted(state) == sorted(p.name for p in param_table(TINY))  # the order is the framework's
    for name, w in want.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)


def test_a_hugging_face_directory_loads_its_weights_exactly(backend, tmp_path):
    write_synthetic(tmp_path, TINY, seed=3, init="conformance")  # Conv1D layout: transposed on the way in
    state, want = backend.state(backends.load(backend.name, tmp_path)), synthetic_params(TINY, 3, "conformance")
    for name, w in want.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)


@pytest.mark.parametrize("variant", ["learned_sinks", "ngpt-seed", "seed002-axm"])
def test_a_checkpoint_rebuilds_its_variant(backend, variant, tmp_path):
    spec, params = weights(variant)
    model = backends.load(backend.name, save(tmp_path / f"{variant}.safetensors", spec, params, synthetic=True))
    assert model.spec == spec and isinstance(model, native_class(backend.name, spec))
    state = backend.state(model)
    assert sorted(state) == sorted(p.name for p in param_table(spec))  # the order is the framework's
    for name, w in params.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    tokens = ids(spec, (2, 48), seed=5)  # the conformance case's shape (test-mini B2xT48)
    assert_close(backend.forward(model, tokens), reference.forward(spec, params, tokens), "logits", variant)


def test_transformers_checkpoint_gives_transformers_logits(backend, tmp_path):
    """External oracle: GPT2LMHeadModel.save_pretrained, with transformers' own init, read by
    load(backend, path), gives transformers' own logits."""
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
    mine = backend.forward(backends.load(backend.name, tmp_path), tokens)
    assert rel_l2(mine, theirs) < bound("float32", "logits", "rel_l2", pairwise=True)


# -- the framework's own initialization (SPEC.md 5 and 11) --------------------------------------------------
def test_own_init_follows_the_spec(backend):
    spec = ModelSpec(vocab_size=1000, n_positions=64, n_embd=256, n_layer=8, n_head=4)
    seed_framework(backend.name, 0)
    state = backend.state(native_class(backend.name, spec)(spec))
    assert sorted(state) == sorted(p.name for p in param_table(spec))  # the order is the framework's
    assert abs(state["wte.weight"].std() - 0.02) < 5e-4
    assert abs(state["h.1.attn.c_proj.weight"].std() - 0.02 / np.sqrt(2 * 8)) < 2e-4  # scaled by 1/sqrt(2 n_layer)
    assert not state["h.1.attn.c_attn.bias"].any() and (state["ln_f.weight"] == 1).all()


@pytest.mark.parametrize("variant", NGPT_VARIANTS)
def test_own_ngpt_init_is_unit_norm_with_scales_at_their_init(backend, variant):
    spec = variant_spec(variant, MINI)
    seed_framework(backend.name, 0)
    state = backend.state(native_class(backend.name, spec)(spec))
    assert sorted(state) == sorted(p.name for p in param_table(spec))  # the order is the framework's
    for p in param_table(spec):
        if p.unit_norm_axis is not None:
            np.testing.assert_allclose(np.linalg.norm(state[p.name], axis=p.unit_norm_axis), 1, rtol=1e-6,
                                       err_msg=p.name)
        else:
            assert np.all(state[p.name] == np.float32(init_law(spec, p)[0])), p.name


# -- what conformance does not reach: statistics, normalization, draws, padding, plain-op attention ----------
@pytest.mark.parametrize("variant", ["gpt2", "seed002-axm"])
def test_residual_stats_match_the_reference(backend, variant):
    spec, params, model = built(backend, variant)
    tokens = ids(spec, (2, 48), seed=13)
    got, want = backend.residual_stats(model, tokens), reference.residual_stats(spec, params, tokens)
    assert list(got) == list(want) == ["input", "mid", "output", "normed"]
    for name, x in got.items():
        assert x.dtype == np.float64 and x.shape == (spec.n_layer,), name
        assert_close(x, want[name], "stats", f"residual {name}")


@pytest.mark.parametrize("variant, dtype", [(v, "float32") for v in NGPT_VARIANTS] + [("ngpt", "bfloat16")])
def test_normalize_matches_the_reference_and_never_writes_the_callers_arrays(backend, variant, dtype):
    if dtype not in backend.dtypes(backend.devices()[0]):
        pytest.skip(f"{backend.name} does not run {dtype} on {backend.devices()[0]}")
    spec, params = weights(variant)
    off = perturb(spec, params, seed=0)  # every unit-norm matrix pushed off the sphere
    given = {n: a.copy() for n, a in off.items()}
    model = backend.build(spec, off, dtype)
    backend.normalize(model)
    got = backend.state(model)
    expected = reference.normalize_weights(spec, {n: round_to_dtype(a, dtype) for n, a in off.items()})
    assert sorted(got) == sorted(p.name for p in param_table(spec))
    for p in param_table(spec):
        assert got[p.name].dtype == np.float32, p.name
        assert_close(got[p.name], expected[p.name], "weights", p.name, dtype)
        np.testing.assert_array_equal(off[p.name], given[p.name], err_msg=f"{p.name}: the caller's array changed")
        if p.unit_norm_axis is None:  # scaling vectors are never normalized
            np.testing.assert_array_equal(got[p.name], round_to_dtype(off[p.name], dtype), err_msg=p.name)


def test_normalize_leaves_gpt2_alone(backend):
    _, _, model = built(backend)
    before = backend.state(model)
    backend.normalize(model)
    for name, a in backend.state(model).items():
        np.testing.assert_array_equal(a, before[name], err_msg=name)


@pytest.mark.variant("early-exit")
def test_the_native_early_exit_loss_takes_its_draws_as_a_user_passes_them(backend):
    spec, params, model = built(backend, "early-exit")
    tokens, targets = ids(spec, (2, 48), seed=1), ids(spec, (2, 48), seed=2)
    draws = exit_draws(spec, params, tokens, seed=0)
    loss = model.loss(native(backend.name, tokens), native(backend.name, targets),
                      native(backend.name, draws.astype(np.float32))).item()
    want = reference.loss(spec, params, tokens, targets, draws)
    assert abs(loss - want) / want < bound("float32", "loss", "rel_l2")
    assert backend.loss_and_grads(model, tokens, targets, draws).loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.variant("padded-vocab")
def test_padded_vocabulary_rows_get_exactly_zero_gradient(backend):
    """SPEC.md 19: logits are padded_vocab_size wide, the loss sees the first vocab_size only."""
    spec, params, model = built(backend, "padded-vocab")
    tokens = ids(spec, (2, 48), seed=12)
    got = backend.loss_and_grads(model, tokens, np.roll(tokens, -1, axis=1))
    assert got.logits.shape == (2, 48, spec.padded_vocab_size) and spec.padded_vocab_size > spec.vocab_size
    assert not got.grads["wte.weight"][spec.vocab_size:].any()  # exactly zero


@pytest.mark.parametrize("options", [
    dict(attention_values="identity", attention="learned_sinks"),
    dict(attention_values="identity", attention="softmax1", head_reduce="sum", blocks="shared"),
    dict(attention_values="identity", attention="softmax_c", softmax_c=3.0, block_form="parallel",
         parallel_attn_scale=0.5, loss="all_layers_local"),
], ids=["sinks", "softmax1-sum-shared", "softmax_c-parallel-local"])
def test_identity_values_with_sinks_match_the_reference_and_the_cache(backend, options):
    """Combinations no named variant has: the plain-op attention with each sink, and its KV cache."""
    spec = MINI.replace(**options)
    params = synthetic_params(spec, 0, "conformance")
    tokens = ids(spec, (2, 20), seed=9)
    targets = np.roll(tokens, -1, axis=1)
    ref = reference.loss_and_grads(spec, params, tokens, targets)
    model = backend.build(spec, params)
    got = backend.loss_and_grads(model, tokens, targets)
    assert_close(got.logits, ref.logits, "logits", "logits")
    assert_close(np.float64(got.loss), np.float64(ref.loss), "loss", "loss")
    for name, g in ref.grads.items():
        assert_close(got.grads[name], g, "grads", name)
    cache, parts = None, []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        logits, cache = backend.extend(model, tokens[:, a:b], cache)
        parts.append(logits)
    assert_close(np.concatenate(parts, axis=1), ref.logits, "logits", "cached")
