"""Generation with a KV cache (SPEC.md 12), for every installed backend that implements `extend`.

Cached logits (a prefill, then single tokens and chunks, crossing the cache's growth steps) must
equal the float64 reference's logits of the whole sequence under the logits bound of SPEC.md 9,
in every variant; greedy generation through backends/generation.py must equal the reference's,
token for token, except at a near-tie of the reference (conformance/generation.py), and so must
every pair of backends. A backend without `extend` is skipped with the reason, and is picked up
here, unchanged, once it has one.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest

from gptspec import backends
from gptspec.backends.generation import generate
from gptspec.conformance.generation import ReferenceBackend, judge_against_reference, judge_greedy
from gptspec.conformance.metrics import errors
from gptspec.spec import BackendError, InputError, ModelSpec, reference
from gptspec.spec.sampling import Sampling
from gptspec.spec.tolerance import METRICS, bound
from gptspec.spec.variants import VARIANTS
from gptspec.weights import round_to_dtype
from gptspec.weights.synthetic import synthetic_params

from helpers import FORWARD_VARIANTS, selected_backends  # a loss-only variant generates as GPT-2 does

MINI = ModelSpec.preset("test-mini")  # n_positions 64
SPLITS = (17, 1, 1, 1, 1, 1, 9, 1, 8)  # a prefill, single tokens, chunks: 40 positions
PROMPTS = ([3, 141, 59, 26, 5], [9, 2, 65, 35, 89, 79, 32, 38, 46, 26, 43], [7])
NEW = 24


@lru_cache(maxsize=None)
def weights(variant: str):
    spec = VARIANTS[variant].apply(MINI)
    return spec, synthetic_params(spec, 0, "conformance")


@lru_cache(maxsize=None)
def generation_support(name: str) -> str | None:
    """None if `name` generates; else why not (it raises 'does not implement generation')."""
    b = backends.get(name)
    spec, params = weights("gpt2")
    try:
        b.extend(b.build(spec, params, "float32"), np.zeros((1, 1), np.int64), None)
    except BackendError as e:
        if "does not implement generation" in str(e):
            return f"{e}: skipped until it does"
        raise
    return None


@pytest.fixture
def backend(request):  # parametrized over the selected backends by tests/conftest.py
    why = generation_support(request.param)
    if why:
        pytest.skip(why)
    return backends.get(request.param)


def assert_within(got, want, dtype, what, pairwise=False):
    for metric, err in zip(METRICS, errors(got, want)):
        limit = bound(dtype, "logits", metric, pairwise)
        assert err <= limit, f"{what}: logits {metric} {err:.3g} > bound {limit:.3g} ({dtype})"


def small_steps(monkeypatch, name: str) -> None:
    """Make the backend's cache grow every 8 positions (where it has a step), so growth is tested."""
    try:
        module = importlib.import_module(f"gptspec.backends.{name}.model")
    except ImportError:
        return
    if hasattr(getattr(module, "KVCache", None), "step"):
        monkeypatch.setattr(module.KVCache, "step", 8)


def extend_in_pieces(b, model, tokens, splits=SPLITS):
    out, cache, start = [], None, 0
    for t in splits:
        logits, cache = b.extend(model, tokens[:, start : start + t], cache)
        assert logits.shape == (len(tokens), t, model.spec.padded_vocab_size) and logits.dtype == np.float32
        out.append(logits)
        start += t
    return np.concatenate(out, axis=1), cache


# -- logits --------------------------------------------------------------------------------------
@pytest.mark.parametrize("growth", ["default", "every 8 positions"])
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_cached_logits_equal_the_whole_sequence(backend, variant, growth, monkeypatch):
    if growth != "default":
        small_steps(monkeypatch, backend.name)
    spec, params = weights(variant)
    tokens = np.random.default_rng(1).integers(0, spec.vocab_size, (2, sum(SPLITS)))
    got, _ = extend_in_pieces(backend, backend.build(spec, params, "float32"), tokens)
    assert_within(got, reference.forward(spec, params, tokens), "float32", f"{backend.name} {variant}")


def test_cached_logits_in_bfloat16(backend):
    """bfloat16 against the reference run on the bfloat16-rounded weights (SPEC.md 7)."""
    if "bfloat16" not in backend.dtypes(backend.devices()[0]):
        pytest.skip(f"{backend.name} does not run bfloat16 on {backend.devices()[0]}")
    spec, params = weights("gpt2")
    tokens = np.random.default_rng(2).integers(0, spec.vocab_size, (2, sum(SPLITS)))
    rounded = {n: round_to_dtype(a, "bfloat16").astype(np.float64) for n, a in params.items()}
    got, _ = extend_in_pieces(backend, backend.build(spec, params, "bfloat16"), tokens)
    assert_within(got, reference.forward(spec, rounded, tokens), "bfloat16", f"{backend.name} gpt2")


@pytest.mark.parametrize("variant", ["gpt2", "ngpt"])
def test_last_only_gives_the_last_position(backend, variant):
    spec, params = weights(variant)
    model = backend.build(spec, params, "float32")
    tokens = np.random.default_rng(3).integers(0, spec.vocab_size, (3, 12))
    full, cache = backend.extend(model, tokens[:, :7], None)
    last, _ = backend.extend(model, tokens[:, 7:], cache, last_only=True)
    assert last.shape == (3, 1, spec.vocab_size)
    assert_within(last[:, 0], reference.forward(spec, params, tokens)[:, -1], "float32", "last_only")


@pytest.mark.parametrize("variant", ["gpt2", "ngpt"])
def test_two_caches_extended_in_turns_stay_apart(backend, variant):
    """Two caches of one batch size, extended in turns: neither sees the other's keys (a cache kept
    in the model, or captured by a compiled step, would be shared)."""
    spec, params = weights(variant)
    model = backend.build(spec, params, "float32")
    a, b = (np.random.default_rng(s).integers(0, spec.vocab_size, (3, 12)) for s in (8, 9))
    (la, ca), (lb, cb) = backend.extend(model, a[:, :6], None), backend.extend(model, b[:, :6], None)
    got_a, got_b = [la], [lb]
    for i in range(6, 12):
        la, ca = backend.extend(model, a[:, i:i + 1], ca)
        lb, cb = backend.extend(model, b[:, i:i + 1], cb)
        got_a.append(la)
        got_b.append(lb)
    assert_within(np.concatenate(got_a, 1), reference.forward(spec, params, a), "float32", "cache a")
    assert_within(np.concatenate(got_b, 1), reference.forward(spec, params, b), "float32", "cache b")


def test_the_cache_cannot_pass_the_context(backend):
    spec, params = weights("gpt2")
    model = backend.build(spec, params, "float32")
    _, cache = backend.extend(model, np.ones((1, spec.n_positions - 2), np.int64), None)
    with pytest.raises(InputError, match=f"3 tokens after the {spec.n_positions - 2} in the cache pass the "
                                         f"context length n_positions={spec.n_positions}"):
        backend.extend(model, np.ones((1, 3), np.int64), cache)
    _, cache = backend.extend(model, np.ones((1, 2), np.int64), cache)  # refused, not half-written: exactly full
    with pytest.raises(InputError, match="n_positions"):
        backend.extend(model, np.ones((1, 1), np.int64), cache)


# -- greedy generation ---------------------------------------------------------------------------
@lru_cache(maxsize=None)
def generation_weights(variant: str):
    """The synthetic weights, with GPT-2's token embedding shrunk 10x: at full size a random model's
    residual stream is mostly the token's own embedding, which the tied head maps back to the same
    token, so greedy decoding repeats one id and would not notice a wrong cache. Shrunk, the next
    token depends on the attention over the whole context (and differs between the variants)."""
    spec, params = weights(variant)
    if spec.architecture == "gpt2":
        params = dict(params, **{"wte.weight": params["wte.weight"] * np.float32(0.1)})
    return spec, params


@lru_cache(maxsize=None)
def greedy(name: str, variant: str) -> tuple[tuple[int, ...], ...]:
    spec, params = generation_weights(variant)
    if name == "reference":
        b, model = ReferenceBackend(spec, params), None
    else:
        b = backends.get(name)
        model = b.build(spec, params, "float32")
    out = generate(b, model, spec, PROMPTS, NEW, Sampling(temperature=0), stop=None)
    assert all(len(n) == NEW for n in out.new)
    return tuple(tuple(n) for n in out.new)


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_greedy_generation_equals_the_reference(backend, variant):
    spec, params = generation_weights(variant)
    for prompt, want, got in zip(PROMPTS, greedy("reference", variant), greedy(backend.name, variant)):
        verdict = judge_against_reference(spec, params, prompt, want, got, "float32")
        assert verdict.ok, f"{backend.name} {variant}, prompt of {len(prompt)}: {verdict}"


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_backends_agree_on_greedy_continuations(variant, request):
    names = [n for n in selected_backends(request.config) if not generation_support(n)]
    if len(names) < 2:
        pytest.skip(f"needs two backends that generate; here: {', '.join(names) or 'none'}")
    spec, params = generation_weights(variant)
    for a, b in combinations(names, 2):
        for prompt, x, y in zip(PROMPTS, greedy(a, variant), greedy(b, variant)):
            verdict = judge_against_reference(spec, params, prompt, x, y, "float32")
            assert verdict.ok, f"{a}~{b} {variant}, prompt of {len(prompt)}: {verdict}"


# -- the tie rule itself -------------------------------------------------------------------------
def test_a_divergence_at_a_near_tie_is_accepted_and_elsewhere_refused():
    logits = np.zeros((4, 6))
    logits[:, 5] = 10.0                       # the scale: the largest logit along the path
    logits[2, 1], logits[2, 2] = 8.0, 8.0 - 1e-5  # the prompt's last row (index 2) nearly ties 1 and 2
    tie = judge_greedy(logits, 3, [1, 4], [2, 4], "float32")
    assert not tie.same and tie.ok and tie.step == 0 and tie.tokens == (1, 2)
    assert abs(tie.gap - 1e-5) < 1e-9 and tie.allowed == bound("float32", "logits", "rel_max", True) * 10
    logits[2, 2] = 7.0
    assert not judge_greedy(logits, 3, [1, 4], [2, 4], "float32").ok
    assert judge_greedy(logits, 3, [1, 4], [1, 4], "float32").same
    assert not judge_greedy(logits, 3, [1, 4], [1], "float32").ok  # a length difference is never a tie
