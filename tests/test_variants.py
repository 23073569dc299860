"""Variants I: softmax1 / softmax_c / learned sinks and nGPT, in the spec and the reference (every backend's
are tests/test_backend_contract.py's and the conformance suite's)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gptspec.spec import ModelSpec, SpecError, WeightsError, param_table, reference
from gptspec.spec.params import ngpt_scales
from gptspec.spec.reference.ops import causal_attention_forward
from gptspec.spec.variants import VARIANTS, get_variant, variant_name
from gptspec.spec.tolerance import bound
from gptspec.weights import load_checkpoint, save, synthetic_params, write_hf

from helpers import params64 as _params, rel_l2

MINI = ModelSpec.preset("test-mini")


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(architecture="ngpt"), "positions='learned' cannot combine with architecture='ngpt'"),
    (dict(architecture="ngpt", positions="rope", attention="softmax1"), "attention='softmax1' is not defined for architecture='ngpt'"),
    (dict(mlp="swiglu"), "mlp='swiglu' is not defined for architecture='gpt2'"),
    (dict(positions="rope"), "positions='rope' is not defined for architecture='gpt2'"),
    (dict(ngpt_alpha="signed"), "ngpt_alpha='signed' is not defined for architecture='gpt2'"),
    (dict(softmax_c=0.5), "softmax_c=0.5 applies only to attention='softmax_c'"),
    (dict(attention="softmax_c", softmax_c=-1.0), "softmax_c must be a positive float"),
    (dict(architecture="ngpt", positions="rope", n_embd=6, n_head=2), "head_dim \\(3\\) must be even"),
    (dict(architecture="ngpt", positions="none", rope_base=500.0), "rope_base=500.0 applies only to positions='rope'"),
])
def test_variants_that_cannot_combine_are_refused(changes, message):
    with pytest.raises(SpecError, match=message):
        ModelSpec(**changes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_a_valid_spec_and_round_trips(variant):
    spec = get_variant(variant).apply(MINI)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert variant_name(spec) == variant


def test_unknown_variant_lists_known_ones():
    with pytest.raises(SpecError, match="unknown variant 'ngpt2'.*softmax1"):
        get_variant("ngpt2")


# -- softmax1 and sinks ------------------------------------------------------------------------
def _qkv(seed=0, B=2, H=3, T=7, D=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, T, D)) * 2 for _ in range(3))


@pytest.mark.variant("softmax1")
def test_softmax1_equals_attention_over_an_extra_zero_key():
    # variants.md form (a): standard attention over T+1 keys with k* = 0 and v* = 0 visible to all
    q, k, v = _qkv()
    y1, _ = causal_attention_forward(q, k, v, 0.5, sink=np.zeros(3))
    B, H, T, D = q.shape
    s = np.concatenate([np.zeros((B, H, T, 1)), (q @ k.swapaxes(-1, -2)) * 0.5], axis=-1)
    s[..., 1:] = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, s[..., 1:])
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(y1, w[..., 1:] @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.variant("softmax1")
def test_softmax1_equals_softmax_times_sigmoid_of_lse():
    # variants.md form (b): y1 = y_softmax * sigmoid(LSE_i)
    q, k, v = _qkv(1)
    y1, _ = causal_attention_forward(q, k, v, 0.5, sink=np.zeros(3))
    y, (_, _, _, p, _, _) = causal_attention_forward(q, k, v, 0.5)
    T = q.shape[2]
    s = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, (q @ k.swapaxes(-1, -2)) * 0.5)
    lse = np.log(np.exp(s).sum(-1, keepdims=True))
    np.testing.assert_allclose(y1, y / (1 + np.exp(-lse)), rtol=1e-12, atol=1e-14)


@pytest.mark.variant("softmax1")
def test_sink_form_is_stable_for_very_negative_scores():
    # the naive max-subtraction overflows e^{-m} for m < -88 in float32 and -709 in float64
    q, k, v = _qkv(2)
    y1, (_, _, _, p, _, _) = causal_attention_forward(q * 100, k * 100, v, 1.0, sink=np.zeros(3))
    assert np.isfinite(y1).all() and (p.sum(-1) <= 1 + 1e-12).all()


@pytest.mark.variant("learned_sinks", "softmax1")
def test_learned_sinks_start_as_softmax1():
    spec = get_variant("learned_sinks").apply(MINI)
    p = _params(spec, 0, "gpt2")
    assert all(not p[f"h.{i}.attn.sinks"].any() for i in range(spec.n_layer))
    q = {k: v for k, v in p.items() if not k.endswith("sinks")}
    tokens = np.arange(20).reshape(1, 20)
    np.testing.assert_array_equal(
        reference.forward(spec, p, tokens), reference.forward(get_variant("softmax1").apply(MINI), q, tokens))


@pytest.mark.variant("softmax1", "softmax_c", "learned_sinks")
def test_sink_variants_differ_from_softmax():
    """The sinks change the model: a backend that silently dropped one would fail conformance."""
    tokens = np.random.default_rng(1).integers(0, MINI.vocab_size, (3, 16))
    softmax = reference.forward(MINI, _params(MINI), tokens)
    for name in ("softmax1", "softmax_c", "learned_sinks"):
        spec = get_variant(name).apply(MINI)
        assert rel_l2(reference.forward(spec, _params(spec), tokens), softmax) > 10 * bound("float32", "logits", "rel_l2"), name


@pytest.mark.variant("softmax_c")
def test_tiny_c_approaches_the_standard_softmax():
    p = _params(MINI, 3)
    tokens = np.arange(30).reshape(1, 30)
    tiny = reference.forward(MINI.replace(attention="softmax_c", softmax_c=1e-30), p, tokens)
    np.testing.assert_allclose(tiny, reference.forward(MINI, p, tokens), rtol=1e-12, atol=1e-12)


# -- nGPT ----------------------------------------------------------------------------------------
NGPT = get_variant("ngpt").apply(MINI)


@pytest.mark.variant("ngpt", "ngpt-seed")
def test_ngpt_table():
    shapes = {p.name: (p.shape, p.unit_norm_axis) for p in param_table(NGPT)}
    C, V = 64, 257
    assert shapes["wte.weight"] == ((V, C), 1) and shapes["lm_head.weight"] == ((V, C), 1)
    assert shapes["h.0.attn.c_attn.weight"] == ((3 * C, C), 1)
    assert shapes["h.0.attn.c_proj.weight"] == ((C, C), 0)
    assert shapes["h.0.mlp.c_fc.weight"] == ((8 * C, C), 1)  # SwiGLU: u and v
    assert shapes["h.0.mlp.c_proj.weight"] == ((C, 4 * C), 0)
    assert shapes["sz"] == ((V,), None) and "wpe.weight" not in shapes and "ln_f.weight" not in shapes
    seed = {p.name: p.shape for p in param_table(get_variant("ngpt-seed").apply(MINI))}
    assert seed["h.0.mlp.c_fc.weight"] == (4 * C, C) and seed["h.0.mlp.suv"] == (4 * C,)


@pytest.mark.variant("ngpt", "ngpt-seed")
def test_ngpt_scale_reparametrisation():
    d = 64
    s = ngpt_scales(NGPT)
    assert math.isclose(s["ngpt_alpha"].init * s["ngpt_alpha"].multiplier, 0.05)
    for role in ("ngpt_sqk", "ngpt_suv", "ngpt_sz"):
        assert math.isclose(s[role].init * s[role].multiplier, 1.0 if role != "ngpt_suv" else math.sqrt(d))
    assert math.isclose(s["ngpt_sqk"].init, d**-0.5)
    seed = ngpt_scales(get_variant("ngpt-seed").apply(MINI))
    assert math.isclose(seed["ngpt_sqk"].init, 1 / d) and math.isclose(seed["ngpt_sz"].multiplier, d)
    p = _params(NGPT, 0, "gpt2")
    assert np.allclose(p["h.1.attn_alpha"], d**-0.5) and np.allclose(p["sz"], d**-0.5)
    assert np.allclose(np.linalg.norm(p["h.0.mlp.c_proj.weight"], axis=0), 1)
    assert np.allclose(np.linalg.norm(p["wte.weight"], axis=1), 1)


@pytest.mark.variant("ngpt")
def test_ngpt_logits_are_bounded_by_s_z():
    # the last hidden state and every row of E_out are unit vectors: |raw logit| <= 1
    p = _params(NGPT, 2)
    logits = reference.forward(NGPT, p, np.arange(40).reshape(2, 20))
    sz = p["sz"] * ngpt_scales(NGPT)["ngpt_sz"].multiplier
    assert np.abs(logits / sz).max() <= 1 + 1e-12


@pytest.mark.variant("ngpt")
def test_normalize_weights_is_unit_norm_along_the_embedding_axis():
    rng = np.random.default_rng(0)
    p = {k: v * rng.uniform(0.5, 2, v.shape) for k, v in _params(NGPT).items()}
    out = reference.normalize_weights(NGPT, p)
    for info in param_table(NGPT):
        if info.unit_norm_axis is None:
            np.testing.assert_array_equal(out[info.name], p[info.name])  # scaling vectors untouched
        else:
            np.testing.assert_allclose(np.linalg.norm(out[info.name], axis=info.unit_norm_axis), 1, rtol=1e-14)


@pytest.mark.variant("ngpt-seed")
def test_alpha_sign_matters_only_for_the_signed_variant():
    seed = get_variant("ngpt-seed").apply(MINI)
    p = _params(seed, 1)
    flipped = dict(p, **{f"h.{i}.attn_alpha": -p[f"h.{i}.attn_alpha"] for i in range(2)})
    tokens = np.arange(10).reshape(1, 10)
    assert not np.allclose(reference.forward(seed, p, tokens), reference.forward(seed, flipped, tokens))
    nvidia = seed.replace(ngpt_alpha="abs")
    np.testing.assert_array_equal(reference.forward(nvidia, p, tokens), reference.forward(nvidia, flipped, tokens))


# -- files and backends ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_carries_its_variant(tmp_path, variant):
    spec = get_variant(variant).apply(MINI)
    path = save(tmp_path / "m.safetensors", spec, synthetic_params(spec, 0), synthetic=True)
    ckpt = load_checkpoint(path)
    assert ckpt.spec == spec and ckpt.metadata["variant"] == variant
    assert json.loads(ckpt.metadata["model_spec"])["architecture"] == spec.architecture


def test_hugging_face_layout_refuses_variants(tmp_path):
    spec = get_variant("softmax1").apply(MINI)
    with pytest.raises(WeightsError, match="cannot hold attention='softmax1'"):
        write_hf(tmp_path / "hf", spec, synthetic_params(spec))
