"""Next-token selection (spec/sampling.py) and the shared generation loop (backends/generation.py).

The sampling filters are checked against Hugging Face's logits warpers (an external oracle); the
loop against a naive generator written here that reruns the float64 reference on the whole
sequence at every step (no cache), through a test backend whose "cache" is the tokens so far.
"""
from __future__ import annotations

import numpy as np
import pytest

from gptspec.backends.generation import generate, steps
from gptspec.spec import InputError, ModelSpec, reference
from gptspec.spec.sampling import Sampling, filtered_logits, next_tokens, probabilities
from gptspec.weights.synthetic import synthetic_params

SPEC = ModelSpec.preset("test-tiny")
PARAMS = synthetic_params(SPEC, 0, "conformance")


class ReferenceBackend:
    """extend() by rerunning the reference on everything so far: correct by construction, slow."""
    name = "reference"

    def extend(self, model, tokens, cache, last_only=False):
        seq = tokens if cache is None else np.concatenate([cache, tokens], axis=1)
        logits = reference.forward(SPEC, PARAMS, seq)[:, -tokens.shape[1]:]
        return (logits[:, -1:] if last_only else logits), seq


def naive_greedy(prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(reference.forward(SPEC, PARAMS, np.array([seq]))[0, -1])))
    return seq[len(prompt):]


# -- sampling ----------------------------------------------------------------------------------
def logits_batch(seed=0, B=4, V=64):
    return np.random.default_rng(seed).standard_normal((B, V)) * 3


def test_greedy_is_the_argmax_of_the_real_vocabulary():
    x = logits_batch()
    x[:, 60:] = 100.0  # padding ids with the largest logits are still never chosen
    got = next_tokens(x, 60, Sampling(temperature=0), np.random.default_rng(0))
    assert (got == x[:, :60].argmax(-1)).all()


def test_padding_is_never_sampled():
    x = logits_batch(V=70)
    x[:, 61:] = 50.0
    rng = np.random.default_rng(1)
    draws = np.concatenate([next_tokens(x, 61, Sampling(temperature=2.0), rng) for _ in range(200)])
    assert draws.max() < 61


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_keeps_what_hugging_face_keeps(k):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper

    x = logits_batch(k)
    ours = np.isfinite(filtered_logits(x, 64, Sampling(temperature=1.0, top_k=k)))
    theirs = torch.isfinite(TopKLogitsWarper(k)(None, torch.tensor(x))).numpy()
    assert (ours == theirs).all() and (ours.sum(-1) == k).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_what_hugging_face_keeps(p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    x = logits_batch(int(p * 100))
    ours = np.isfinite(filtered_logits(x, 64, Sampling(temperature=1.0, top_p=p)))
    theirs = torch.isfinite(TopPLogitsWarper(p)(None, torch.tensor(x))).numpy()
    assert (ours == theirs).all()


def test_draws_follow_the_distribution():
    x = logits_batch(3, B=1, V=8)
    s = Sampling(temperature=0.7, top_k=6)
    want = probabilities(x, 8, s)[0]
    rng = np.random.default_rng(2)
    n = 20000
    counts = np.bincount(np.concatenate([next_tokens(np.repeat(x, 100, 0), 8, s, rng) for _ in range(n // 100)]),
                         minlength=8)
    assert counts[want == 0].sum() == 0
    # 5 standard errors: a wrong temperature or an off-by-one in the CDF moves some bin by far more
    assert np.all(np.abs(counts / n - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=0),
                                 dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        Sampling(**bad)


# -- the loop ----------------------------------------------------------------------------------
def test_greedy_generation_matches_rerunning_the_whole_sequence():
    out = generate(ReferenceBackend(), None, SPEC, [[1, 2, 3]], 6, Sampling(temperature=0), stop=None)
    assert out.new == [naive_greedy([1, 2, 3], 6)]
    assert out.stopped == ["max_new_tokens"]


def test_prompts_of_different_lengths_generate_as_if_alone():
    prompts = [[5], [7, 8, 9, 10], [11, 12]]
    batch = generate(ReferenceBackend(), None, SPEC, prompts, 4, Sampling(temperature=0), stop=None)
    assert batch.new == [naive_greedy(p, 4) for p in prompts]


def test_generation_stops_at_the_stop_token_and_keeps_it():
    first = naive_greedy([1, 2], 1)[0]
    out = generate(ReferenceBackend(), None, SPEC, [[1, 2]], 8, Sampling(temperature=0), stop=first)
    assert out.new == [[first]] and out.stopped == ["stop token"]


def test_generation_stops_when_the_context_is_full():
    prompt = list(range(1, SPEC.n_positions - 2))
    out = generate(ReferenceBackend(), None, SPEC, [prompt], 10, Sampling(temperature=0), stop=None)
    assert len(prompt) + len(out.new[0]) == SPEC.n_positions and out.stopped == ["context"]


def test_sampling_is_reproducible_from_the_seed():
    s = Sampling(temperature=1.0, top_k=20, seed=7)
    a = generate(ReferenceBackend(), None, SPEC, [[1], [2]], 5, s, stop=None).new
    b = generate(ReferenceBackend(), None, SPEC, [[1], [2]], 5, s, stop=None).new
    c = generate(ReferenceBackend(), None, SPEC, [[1], [2]], 5, Sampling(1.0, 20, seed=8), stop=None).new
    assert a == b and a != c


def test_steps_stream_one_token_per_row_per_position():
    seen = [s.position for s in steps(ReferenceBackend(), None, SPEC, [[1, 2], [3]], 3, Sampling(0), stop=None)]
    assert seen == [1, 2, 3, 4]


@pytest.mark.parametrize("prompts, why", [
    ([], "at least one prompt"), ([[]], "empty"), ([[1] * 16], "context holds 16"), ([[99]], "outside"),
])
def test_bad_prompts_are_refused(prompts, why):
    with pytest.raises(InputError, match=why):
        generate(ReferenceBackend(), None, SPEC, prompts, 3)


# -- judging a backend's greedy continuation with one reference run (conformance/generation.py) --
def test_one_run_along_the_backend_path_finds_the_first_difference_with_the_reference_path():
    """judge_against_reference_greedy (one reference run, along the backend's path) against the two-path
    judgement with the reference's own greedy continuation, rerun naively here."""
    from gptspec.conformance.generation import judge_against_reference, judge_against_reference_greedy

    prompt = [1, 2, 3]
    want = naive_greedy(prompt, 8)
    assert judge_against_reference_greedy(SPEC, PARAMS, prompt, want, "float32").same
    for j in (0, 5):
        other = next(t for t in range(SPEC.vocab_size) if t != want[j])
        got = want[:j] + [other] + want[j + 1:]
        one_run = judge_against_reference_greedy(SPEC, PARAMS, prompt, got, "float32")
        two_paths = judge_against_reference(SPEC, PARAMS, prompt, want, got, "float32")
        assert not one_run.ok and not two_paths.ok
        assert one_run.step == two_paths.step == j and one_run.tokens == (other, want[j]) == two_paths.tokens[::-1]
        assert abs(one_run.gap + two_paths.gap) < 1e-12  # the same row of reference logits, the sides swapped
