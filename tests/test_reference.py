"""The float64 reference: its hand-written backward against finite differences (hypothesis
drawing configs, lengths and tokens), its forward against Hugging Face transformers, and the
properties the spec states (causality, the ignore index, the tied head)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptspec.spec import IGNORE_INDEX, InputError, ModelSpec, param_table, reference
from gptspec.spec.variants import VARIANTS
from gptspec.conformance.cases import exit_draws
from gptspec.spec.reference import gpt2 as ref_gpt2
from gptspec.spec.reference.ops import cross_entropy_forward
from gptspec.weights import synthetic_params


def _params(spec, seed):
    return {k: v.astype(np.float64) for k, v in synthetic_params(spec, seed, "conformance").items()}


# The stop-gradient of all-layer-loss-local makes its gradient that of a surrogate, not of the loss:
# test_stop_gradient_is_the_surrogates_gradient checks it.
_FD_VARIANTS = [name for name, v in VARIANTS.items() if v.changes.get("loss") != "all_layers_local"]


@st.composite
def problems(draw):
    variant = VARIANTS[draw(st.sampled_from(_FD_VARIANTS))]
    n_head = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4]) if variant.changes.get("positions") == "rope" else st.integers(1, 4))
    spec = variant.apply(ModelSpec(
        vocab_size=draw(st.integers(2, 13)), n_positions=draw(st.integers(1, 6)),
        n_embd=n_head * head_dim, n_head=n_head, n_layer=draw(st.integers(1, 2)),
        norm_eps=draw(st.sampled_from([1e-5, 1e-2])),
    ))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, spec.n_positions))
    ids = st.integers(0, spec.vocab_size - 1)
    tokens = np.array(draw(st.lists(ids, min_size=B * T, max_size=B * T))).reshape(B, T)
    targets = np.array(draw(st.lists(st.one_of(ids, st.just(IGNORE_INDEX)), min_size=B * T, max_size=B * T)))
    targets[draw(st.integers(0, B * T - 1))] = draw(ids)  # at least one counted target
    return spec, tokens, targets.reshape(B, T), draw(st.integers(0, 2**16))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_backward_matches_central_finite_differences(problem):
    spec, tokens, targets, seed = problem
    p = _params(spec, seed)
    draws = exit_draws(spec, p, tokens, seed)  # loss="early_exit" only; kept away from every exit boundary
    grads = reference.loss_and_grads(spec, p, tokens, targets, draws).grads
    rng = np.random.default_rng(seed)
    h = 1e-5
    for name, value in p.items():
        # a random direction per tensor covers every element: <grad, d> = (L(p+hd) - L(p-hd)) / 2h
        d = rng.standard_normal(value.shape)
        plus, minus = dict(p), dict(p)
        plus[name], minus[name] = value + h * d, value - h * d
        fd = (reference.loss(spec, plus, tokens, targets, draws)
              - reference.loss(spec, minus, tokens, targets, draws)) / (2 * h)
        analytic = float((grads[name] * d).sum())
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, fd, analytic)


@pytest.mark.parametrize("blocks", ["independent", "shared"])
def test_stop_gradient_is_the_surrogates_gradient(blocks):
    """SPEC.md 18.2: with the gradient stopped between layers, the gradient is that of the surrogate
    sum_l CE(head(block_l(sg h_{l-1}))), whose h_{l-1} (l >= 2) are constants: finite differences of it."""
    spec = ModelSpec(vocab_size=11, n_positions=6, n_embd=8, n_head=2, n_layer=3, loss="all_layers_local",
                     blocks=blocks, norm_eps=1e-2)
    p = _params(spec, 5)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    frozen, _, _ = ref_gpt2._stack_forward(spec, p, tokens)

    def surrogate(q):
        total, h = 0.0, q["wte.weight"][tokens] + q["wpe.weight"][:6]
        for layer in range(spec.n_layer):
            h = ref_gpt2._block_forward(spec, q, ref_gpt2.block_prefix(spec, layer), h if layer == 0 else frozen[layer])[0]
            total += cross_entropy_forward(ref_gpt2._head_forward(spec, q, h)[0], targets)[0]
        return total

    result = reference.loss_and_grads(spec, p, tokens, targets)
    assert result.loss == pytest.approx(surrogate(p), rel=1e-12)
    for name, value in p.items():
        d = rng.standard_normal(value.shape)
        plus, minus = dict(p), dict(p)
        plus[name], minus[name] = value + 1e-5 * d, value - 1e-5 * d
        fd = (surrogate(plus) - surrogate(minus)) / 2e-5
        analytic = float((result.grads[name] * d).sum())
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, fd, analytic)
    # and it is not the loss's own gradient: the stop matters
    full = reference.loss_and_grads(spec.replace(loss="all_layers"), p, tokens, targets)
    assert full.loss == pytest.approx(result.loss, rel=1e-12)
    assert not np.allclose(full.grads["h.0.mlp.c_fc.weight"], result.grads["h.0.mlp.c_fc.weight"])


def test_single_coordinates_match_finite_differences():
    # element-wise, on the tensors whose indexing is easiest to get wrong
    spec = ModelSpec.preset("test-tiny")
    p = _params(spec, 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, spec.vocab_size, (2, 7))
    targets = rng.integers(0, spec.vocab_size, (2, 7))
    grads = reference.loss_and_grads(spec, p, tokens, targets).grads
    h = 1e-6
    coords = [("wte.weight", (tokens[0, 3], 5)), ("wte.weight", (0, 0)), ("wpe.weight", (6, 2)),
              ("wpe.weight", (7, 2)), ("h.0.attn.c_attn.weight", (17, 3)), ("h.0.attn.c_attn.bias", (9,)),
              ("h.0.mlp.c_proj.weight", (1, 30)), ("ln_f.bias", (4,))]
    for name, idx in coords:
        plus, minus = dict(p), dict(p)
        plus[name], minus[name] = p[name].copy(), p[name].copy()
        plus[name][idx] += h
        minus[name][idx] -= h
        fd = (reference.loss(spec, plus, tokens, targets) - reference.loss(spec, minus, tokens, targets)) / (2 * h)
        assert abs(fd - grads[name][idx]) <= 1e-7 * max(1.0, abs(fd)), (name, idx)
    assert not grads["wpe.weight"][7:].any()  # positions beyond T get exactly zero


def test_logits_are_causal():
    spec = ModelSpec.preset("test-mini")
    p = _params(spec, 0)
    tokens = np.random.default_rng(1).integers(0, spec.vocab_size, (1, 20))
    base = reference.forward(spec, p, tokens)
    changed = tokens.copy()
    changed[0, 12] = (changed[0, 12] + 1) % spec.vocab_size
    out = reference.forward(spec, p, changed)
    np.testing.assert_array_equal(out[0, :12], base[0, :12])
    assert np.abs(out[0, 12:] - base[0, 12:]).max() > 1e-3


def test_ignored_targets_do_not_count():
    spec = ModelSpec.preset("test-tiny")
    p = _params(spec, 0)
    tokens = np.arange(8).reshape(1, 8)
    targets = np.arange(1, 9).reshape(1, 8)
    logits = reference.forward(spec, p, tokens)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    partial = targets.copy()
    partial[0, ::2] = IGNORE_INDEX
    expected = -np.mean([logp[0, t, targets[0, t]] for t in range(1, 8, 2)])
    assert math.isclose(reference.loss(spec, p, tokens, partial), expected, rel_tol=1e-12)


def test_zero_embedding_gives_uniform_prediction():
    spec = ModelSpec.preset("test-tiny")
    p = _params(spec, 0)
    p["wte.weight"][:] = 0.0  # the tied head then scores every token 0
    tokens = np.zeros((2, 5), dtype=np.int64)
    loss = reference.loss(spec, p, tokens, tokens)
    assert math.isclose(loss, math.log(spec.vocab_size), rel_tol=1e-12)


@pytest.mark.parametrize("tokens, targets, message", [
    (np.array([[0, 61]]), None, "holds id 61, outside the vocabulary"),
    (np.zeros((1, 17), int), None, "length T=17, longer than the context length n_positions=16"),
    (np.zeros((3,), int), None, r"must have shape \(B, T\)"),
    (np.zeros((1, 3)), None, "integer"),
    (np.zeros((1, 3), int), np.full((1, 3), IGNORE_INDEX), "every target equals the ignore index"),
    (np.zeros((1, 3), int), np.zeros((1, 4), int), "targets must have the shape of tokens"),
    (np.zeros((1, 3), int), np.array([[0, -5, 1]]), "targets hold id -5"),
])
def test_bad_inputs_are_named(tokens, targets, message):
    spec = ModelSpec.preset("test-tiny")
    p = _params(spec, 0)
    with pytest.raises(InputError, match=message):
        if targets is None:
            reference.forward(spec, p, tokens)
        else:
            reference.loss_and_grads(spec, p, tokens, targets)


def test_matches_hugging_face_transformers_in_float64(tmp_path):
    """An external oracle: transformers' GPT2LMHeadModel, run in float64 on the same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gptspec.weights import write_synthetic

    spec = ModelSpec.preset("test-mini")
    write_synthetic(tmp_path, spec, seed=4, init="conformance")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).double().eval()
    p = _params(spec, 4)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, spec.vocab_size, (2, 40))
    targets = rng.integers(0, spec.vocab_size, (2, 40))
    targets[0, 5] = IGNORE_INDEX

    logits = hf(torch.from_numpy(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten())
    loss.backward()
    ref = reference.loss_and_grads(spec, p, tokens, targets)
    np.testing.assert_allclose(ref.logits, logits.detach().numpy(), rtol=1e-10, atol=1e-10)
    assert math.isclose(ref.loss, loss.item(), rel_tol=1e-12)
    hf_grads = {n.removeprefix("transformer."): t.grad.numpy() for n, t in hf.named_parameters()}
    for info in param_table(spec):
        theirs = hf_grads[info.name].T if info.hf_transposed else hf_grads[info.name]  # Conv1D layout
        np.testing.assert_allclose(ref.grads[info.name], theirs, rtol=1e-9, atol=1e-11, err_msg=info.name)
