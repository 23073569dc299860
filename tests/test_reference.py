"""The float64 reference: its hand-written backward against finite differences (hypothesis
drawing configs, lengths and tokens), its forward against Hugging Face transformers, and the
properties the spec states (causality, the ignore index, the tied head)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptspec.spec import IGNORE_INDEX, InputError, ModelSpec, param_table, reference
from gptspec.spec.variants import VARIANTS
from gptspec.conformance.cases import exit_draws
from gptspec.spec.reference import gpt2 as ref_gpt2
from gptspec.spec.reference.ops import cross_entropy_forward

from helpers import params64


# The stop-gradient of all-layer-loss-local makes its gradient that of a surrogate, not of the loss:
# test_stop_gradient_is_the_surrogates_gradient checks it.
_FD_VARIANTS = [name for name, v in VARIANTS.items() if v.changes.get("loss") != "all_layers_local"]


@dataclass(frozen=True)
class Problem:
    """A small model and a batch, drawn independently of the variant (so that pytest, not hypothesis,
    chooses the variant, and --variant can select it): ids above the vocabulary wrap around it, -1 is
    the ignore index, and a RoPE variant rounds an odd head_dim up to the even one it needs."""
    n_head: int
    head_dim: int
    vocab_size: int
    n_positions: int
    n_layer: int
    norm_eps: float
    tokens: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...]
    seed: int

    def spec(self, variant: str) -> ModelSpec:
        v = VARIANTS[variant]
        head_dim = self.head_dim + self.head_dim % 2 if v.changes.get("positions") == "rope" else self.head_dim
        return v.apply(ModelSpec(vocab_size=self.vocab_size, n_positions=self.n_positions,
                                 n_embd=self.n_head * head_dim, n_head=self.n_head, n_layer=self.n_layer,
                                 norm_eps=self.norm_eps))

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        tokens, targets = np.array(self.tokens) % self.vocab_size, np.array(self.targets)
        return tokens, np.where(targets < 0, IGNORE_INDEX, targets % self.vocab_size)


@st.composite
def problems(draw):
    n_positions = draw(st.integers(1, 6))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, n_positions))

    def rows(ids):
        return st.lists(st.lists(ids, min_size=T, max_size=T).map(tuple), min_size=B, max_size=B).map(tuple)

    tokens = draw(rows(st.integers(0, 12)))
    targets = [list(row) for row in draw(rows(st.integers(-1, 12)))]
    counted = draw(st.integers(0, B * T - 1))  # at least one counted target
    targets[counted // T][counted % T] = draw(st.integers(0, 12))
    return Problem(n_head=draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 4)),
                   vocab_size=draw(st.integers(2, 13)), n_positions=n_positions, n_layer=draw(st.integers(1, 2)),
                   norm_eps=draw(st.sampled_from([1e-5, 1e-2])), tokens=tokens,
                   targets=tuple(map(tuple, targets)), seed=draw(st.integers(0, 2**16)))


def directional_derivative(f, h: float = 1e-5) -> float:
    """f'(0) from central differences at h and h/2, combined by Richardson extrapolation so that their
    h^2 f'''/6 error terms cancel, leaving O(h^4 f^(5)).

    The plain central difference is not accurate enough where the loss curves sharply: a LayerNorm
    over two features maps the half-difference d of its inputs to +-d / sqrt(d^2 + eps), a step of
    width sqrt(eps) = 3e-3 at eps = 1e-5 whose third derivative grows as eps^-1.5, so h^2 f'''/6 at
    h = 1e-5 reached 1e-4..1e-2 relative near the step (issue 11: layernorm-noaffine, seed002-axm)."""
    def central(step):
        return (f(step) - f(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


# Found failing with the plain central difference at n_embd = 2, eps = 1e-5 (up to 950x the tolerance);
# pinned, so that every run replays them, in every variant.
STEEP_LAYERNORM = [
    Problem(n_head=2, head_dim=1, vocab_size=3, n_positions=3, n_layer=2, norm_eps=1e-5,
            tokens=((2, 2, 0),), targets=((1, 0, 0),), seed=53648),      # failed in layernorm-noaffine
    Problem(n_head=2, head_dim=1, vocab_size=6, n_positions=2, n_layer=1, norm_eps=1e-5,
            tokens=((4,), (0,)), targets=((5,), (0,)), seed=49387),      # failed in layernorm-noaffine
    Problem(n_head=2, head_dim=1, vocab_size=7, n_positions=6, n_layer=2, norm_eps=1e-5,
            tokens=((0, 3, 4, 3, 2, 3),), targets=((3, 0, 1, 0, 4, 3),), seed=8245),  # failed in seed002-axm
]


@pytest.mark.parametrize("variant", _FD_VARIANTS)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
@example(problem=STEEP_LAYERNORM[0])
@example(problem=STEEP_LAYERNORM[1])
@example(problem=STEEP_LAYERNORM[2])
def test_backward_matches_finite_differences(variant, problem):
    spec, (tokens, targets) = problem.spec(variant), problem.batch()
    p = params64(spec, problem.seed)
    draws = exit_draws(spec, p, tokens, problem.seed)  # loss="early_exit" only; kept away from every exit boundary
    grads = reference.loss_and_grads(spec, p, tokens, targets, draws).grads
    rng = np.random.default_rng(problem.seed)
    for name, value in p.items():
        # a random direction per tensor covers every element: <grad, d> = d/dt L(p + t d) at t = 0
        d = rng.standard_normal(value.shape)

        def along(t):
            return reference.loss(spec, dict(p, **{name: value + t * d}), tokens, targets, draws)

        fd, analytic = directional_derivative(along), float((grads[name] * d).sum())
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, fd, analytic)


@pytest.mark.parametrize("blocks", ["independent", "shared"])
def test_stop_gradient_is_the_surrogates_gradient(blocks):
    """SPEC.md 18.2: with the gradient stopped between layers, the gradient is that of the surrogate
    sum_l CE(head(block_l(sg h_{l-1}))), whose h_{l-1} (l >= 2) are constants: finite differences of it."""
    spec = ModelSpec(vocab_size=11, n_positions=6, n_embd=8, n_head=2, n_layer=3, loss="all_layers_local",
                     blocks=blocks, norm_eps=1e-2)
    p = params64(spec, 5)
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
    p = params64(spec, 3)
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
    p = params64(spec, 0)
    tokens = np.random.default_rng(1).integers(0, spec.vocab_size, (1, 20))
    base = reference.forward(spec, p, tokens)
    changed = tokens.copy()
    changed[0, 12] = (changed[0, 12] + 1) % spec.vocab_size
    out = reference.forward(spec, p, changed)
    np.testing.assert_array_equal(out[0, :12], base[0, :12])
    assert np.abs(out[0, 12:] - base[0, 12:]).max() > 1e-3


def test_ignored_targets_do_not_count():
    spec = ModelSpec.preset("test-tiny")
    p = params64(spec, 0)
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
    p = params64(spec, 0)
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
    p = params64(spec, 0)
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
    p = params64(spec, 4)
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
