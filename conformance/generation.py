"""Judging greedy generations (SPEC.md 12) against the float64 reference and against one another.

Two correct implementations can pick different greedy tokens: where the reference's two best
logits are closer than the implementations' rounding errors, either choice is right, and after
it the paths differ legitimately. So two greedy continuations of the same prompt are compared
token for token up to their first difference, and that difference is accepted if and only if the
reference cannot tell the two tokens apart within the tolerance policy (SPEC.md 9): each side's
logits are within `rel_max` bound x scale of the reference's, so each can flip an order the
reference holds by up to twice that, the pairwise bound (the same for backend~reference and
backend~backend):

    |logp_ref(a) - logp_ref(b)| <= bound(dtype, "logits", "rel_max", pairwise=True) * max|ref logits|

The log-probabilities of one position differ by their logits' difference; the scale is the largest
reference logit along the path's generating positions (the rows that chose its tokens), the
tensor scale that `rel_max` is relative to.

In `gptspec conformance` (run_generation, after each model's own rows): every backend's cached
logits of the case's first sequence (a prefill, single tokens, a chunk) against the reference's
whole-sequence logits under the logits bound, and its greedy continuation of a short prompt
against the reference's, judged as above; then every pair of backends.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..spec import ModelSpec, reference
from ..spec.tolerance import bound


@dataclass(frozen=True)
class GreedyVerdict:
    same: bool                       # token for token identical
    ok: bool                         # identical, or diverging first at a near-tie of the reference
    step: int | None = None          # index in the continuation of the first difference
    tokens: tuple[int, int] | None = None   # (a's token, b's token) there
    gap: float = 0.0                 # the reference's log p(a's token) - log p(b's token) there
    allowed: float = 0.0             # the largest |gap| a tie may have
    message: str = ""

    def __str__(self) -> str:
        return self.message


def judge_greedy(ref_logits: np.ndarray, prompt_len: int, a: Sequence[int], b: Sequence[int],
                 dtype: str, vocab_size: int | None = None) -> GreedyVerdict:
    """Two greedy continuations `a` and `b` of one prompt of `prompt_len` tokens, judged with the
    reference's logits (T, V) along the prompt followed by `a` (T >= prompt_len + len(a) - 1):
    row prompt_len - 1 + j holds the logits that chose a[j] (and b[j], while the paths agree)."""
    a, b = [int(t) for t in a], [int(t) for t in b]
    logits = np.asarray(ref_logits, np.float64)
    V = vocab_size or logits.shape[-1]
    j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if j is None:
        if len(a) == len(b):
            return GreedyVerdict(True, True, message=f"identical ({len(a)} tokens)")
        return GreedyVerdict(False, False, min(len(a), len(b)),
                             message=f"one continuation stops after {min(len(a), len(b))} tokens, the other "
                                     f"after {max(len(a), len(b))}, with no token chosen differently")
    need = prompt_len + j
    if logits.ndim != 2 or logits.shape[0] < need:
        raise ValueError(f"judging a divergence at step {j} needs the reference's logits of {need} positions "
                         f"(T, V), got shape {logits.shape}")
    rows = logits[prompt_len - 1 : prompt_len + len(a) - 1, :V]
    row = logits[need - 1, :V]
    logp = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
    gap = float(logp[a[j]] - logp[b[j]])
    allowed = bound(dtype, "logits", "rel_max", pairwise=True) * float(np.abs(rows).max())
    ok = abs(gap) <= allowed
    what = "a near-tie of the reference, accepted" if ok else "the reference tells them apart"
    return GreedyVerdict(False, ok, j, (a[j], b[j]), gap, allowed,
                         f"first difference at new token {j}: {a[j]} vs {b[j]}, reference log-prob gap "
                         f"{gap:.3g} against a tie threshold of {allowed:.3g} ({dtype}): {what}")


def reference_logits(spec: ModelSpec, params: Mapping[str, np.ndarray], prompt: Sequence[int],
                     new: Sequence[int]) -> np.ndarray:
    """The float64 reference's logits (T, V) along `prompt` followed by `new` (its last token only
    gets chosen, so it is not run)."""
    path = list(prompt) + list(new)[:-1] if new else list(prompt)
    return reference.forward(spec, params, np.array([path], dtype=np.int64))[0]


def judge_against_reference(spec: ModelSpec, params: Mapping[str, np.ndarray], prompt: Sequence[int],
                            want: Sequence[int], got: Sequence[int], dtype: str) -> GreedyVerdict:
    """`got` (a backend's greedy continuation) against `want` (the reference's, or another
    backend's), judged on the reference's logits along `want`. `params` as the backends hold them
    (rounded to `dtype`, SPEC.md 7)."""
    return judge_greedy(reference_logits(spec, params, prompt, want), len(prompt), want, got, dtype,
                        spec.vocab_size)


class ReferenceBackend:
    """`extend` by rerunning the float64 reference on the whole sequence so far: no cache to get
    wrong (its "cache" is the tokens), so the generation loop run on it gives the reference's
    greedy continuation. Slow: for small configs and tests."""
    name = "reference"

    def __init__(self, spec: ModelSpec, params: Mapping[str, np.ndarray]):
        self.spec = spec
        self.params = {n: np.asarray(p, np.float64) for n, p in params.items()}

    def extend(self, model, tokens, cache, last_only=False):
        seq = np.asarray(tokens) if cache is None else np.concatenate([cache, tokens], axis=1)
        logits = reference.forward(self.spec, self.params, seq)[:, -np.shape(tokens)[1]:]
        return (logits[:, -1:] if last_only else logits), seq


# -- generation in the conformance suite (`gptspec conformance`) -----------------------------------
# The greedy check: a short prompt and few new tokens, so that the default command stays quick; the
# cached-logits check runs the case's whole first sequence through the cache.
PROMPT_TOKENS, NEW_TOKENS = 8, 8


def informative_weights(spec: ModelSpec, params: Mapping[str, np.ndarray], synthetic: bool) -> dict:
    """The weights greedy decoding is checked on. Synthetic GPT-2 weights get their token embedding
    shrunk 10x: at full size a random model's residual stream is mostly the token's own embedding,
    which the tied head maps back to the same token, so greedy decoding repeats one id and would not
    notice a wrong cache. Shrunk, the next token depends on the attention over the whole context."""
    if synthetic and spec.architecture == "gpt2":
        return dict(params, **{"wte.weight": np.asarray(params["wte.weight"]) * np.float32(0.1)})
    return dict(params)


# By default generation is checked once per variant on synthetic weights: on its largest model up to this
# size (test-mini's two layers in the default tier). The gpt2 shapes cost seconds per backend and dtype
# (model builds, a float64 reference run) and run the same cache code; `large=True` (the heavy tier)
# checks every model. Real weights always generate: there greedy continuations are text, and ties rare.
LARGE_PARAMS = 10_000_000


def generation_cases(cases: Sequence, large: bool = False) -> list:
    """The cases generation is checked on, in suite order: the first seed of each model (variant,
    size, weights), since further seeds add time and little else to a check of the cache; unless
    `large`, of a variant's synthetic models only the largest up to LARGE_PARAMS parameters."""
    firsts: dict = {}
    for case in cases:
        firsts.setdefault((case.variant, case.preset, case.weights), case)
    if large:
        return list(firsts.values())
    chosen: dict = {}
    for case in firsts.values():
        if case.synthetic and case.spec.n_params <= LARGE_PARAMS:
            best = chosen.get(case.variant)
            if best is None or case.spec.n_params > best.spec.n_params:
                chosen[case.variant] = case
    keep = set(chosen.values())
    return [c for c in firsts.values() if c in keep or not c.synthetic]


def cache_splits(length: int) -> list[int]:
    """A prefill (of the greedy check's prompt length, so that a compiling backend reuses its kernels),
    three single tokens, then the rest as one chunk."""
    first = max(min(PROMPT_TOKENS, length // 2), 1)
    singles = [1] * min(3, length - first)
    rest = length - first - len(singles)
    return [first, *singles] + ([rest] if rest else [])


def cached_logits(backend, model, tokens: np.ndarray) -> np.ndarray:
    """The logits of `tokens` (B, T) fed through `extend` in the pieces of cache_splits(T)."""
    out, cache, start = [], None, 0
    for t in cache_splits(tokens.shape[1]):
        logits, cache = backend.extend(model, tokens[:, start : start + t], cache)
        out.append(np.asarray(logits))
        start += t
    return np.concatenate(out, axis=1)


def judge_against_reference_greedy(spec: ModelSpec, params: Mapping[str, np.ndarray], prompt: Sequence[int],
                                   got: Sequence[int], dtype: str, new: int | None = None) -> GreedyVerdict:
    """`got` (a backend's greedy continuation, of `new` tokens where given) against the reference's own
    greedy continuation, with one reference run along `got`: up to the first position where the
    reference's choice differs from `got` the two paths are the same, so that position is the paths'
    first difference, judged as judge_greedy judges it (a near-tie of the reference is accepted)."""
    got = [int(t) for t in got]
    if new is not None and len(got) != new:
        return GreedyVerdict(False, False, min(len(got), new),
                             message=f"{len(got)} tokens generated where the reference generates {new}")
    logits = reference_logits(spec, params, prompt, got)
    V = spec.vocab_size
    chosen = logits[len(prompt) - 1 : len(prompt) - 1 + len(got), :V].argmax(-1)
    j = next((i for i, (x, y) in enumerate(zip(got, chosen)) if x != y), None)
    want = got if j is None else got[:j] + [int(chosen[j])]
    return judge_greedy(logits, len(prompt), got, want, dtype, V) if j is not None else \
        GreedyVerdict(True, True, message=f"identical ({len(got)} tokens)")


@dataclass(frozen=True)
class GreedyInputs:
    params: dict                # the informative weights, float32, as given to every backend
    prompt: tuple[int, ...]
    new: int                    # tokens to generate
    dtype: str

    @functools.cached_property
    def rounded(self) -> dict:
        """The weights rounded to the dtype, float64: what the reference runs (only the judging needs them,
        not a backend's run in a worker process)."""
        from ..weights import round_to_dtype

        return {n: round_to_dtype(a, self.dtype).astype(np.float64) for n, a in self.params.items()}


_greedy_cache: dict = {}


def greedy_inputs(case, dtype: str, inputs=None) -> GreedyInputs:
    """The weights and prompt (the case's first PROMPT_TOKENS tokens) of the greedy check, from the case's
    weights and tokens (`inputs`: a runner.Reference, by default the reference run's); the current (case,
    dtype) is kept, so that its backends share them."""
    from .runner import reference_run

    key = (case, dtype)
    if key not in _greedy_cache:
        ref = inputs if inputs is not None else reference_run(case, dtype)
        params = informative_weights(ref.spec, ref.params, case.synthetic)
        prompt = tuple(int(t) for t in ref.tokens[0, :PROMPT_TOKENS])
        _greedy_cache.clear()
        _greedy_cache[key] = GreedyInputs(params, prompt, min(NEW_TOKENS, ref.spec.n_positions - len(prompt)), dtype)
    return _greedy_cache[key]


@dataclass
class GenerationRun:
    logits: np.ndarray            # cached logits of the case's first sequence
    greedy: tuple[int, ...]       # greedy continuation of the prompt
    seconds: float


def generation_run(backend, case, dtype: str, device: str, inputs=None) -> GenerationRun:
    """The backend's cached logits of the case's first sequence and its greedy continuation; `inputs` (a
    runner.Reference holding the case's weights and tokens, crossmachine.inputs_of) instead of the
    reference run's, where the float64 reference is not wanted (a worker process)."""
    import time

    from ..backends.generation import generate
    from ..spec.sampling import Sampling
    from .runner import reference_run

    start = time.perf_counter()
    ref = inputs if inputs is not None else reference_run(case, dtype)
    greedy = greedy_inputs(case, dtype, ref)
    model = backend.build(ref.spec, ref.params, dtype, device)
    logits = cached_logits(backend, model, ref.tokens[:1])
    if any(greedy.params[n] is not a for n, a in ref.params.items()):  # the informative weights differ
        model = backend.build(ref.spec, greedy.params, dtype, device)
    got = generate(backend, model, ref.spec, [list(greedy.prompt)], greedy.new, Sampling(temperature=0),
                   stop=None).new[0]
    return GenerationRun(logits, tuple(got), time.perf_counter() - start)


def run_generation(backends, case, dtype: str, device: str | None = None, pairwise: bool = True,
                   on_start=None, on_outcome=None) -> list:
    """Generation with the KV cache for one case and dtype (outcomes of kind "generation"): each
    backend that implements `extend` against the reference (cached logits of the case's first
    sequence under the logits bound; greedy continuation equal up to a near-tie, judge_greedy),
    then every pair."""
    from itertools import combinations

    from ..spec import BackendError
    from . import workers
    from .metrics import compare
    from .runner import Outcome, backend_gap, memory_gap, reference_run

    outcomes: list = []

    def emit(out) -> None:
        outcomes.append(out)
        if on_outcome:
            on_outcome(out)

    too_big = memory_gap(case)
    runs, devices = {}, {}
    spec = case.spec
    for backend in backends:
        dev = devices[backend.name] = device or backend.devices()[0]
        out = Outcome(case.id, backend.name, dev, dtype, "ran", synthetic=case.synthetic, kind="generation")
        gap = backend_gap(backend, spec, dtype, dev)
        if too_big:
            out.status, out.message = "not run", too_big
        elif gap:
            out.status, out.message = gap
        else:
            if on_start:
                on_start(case.id, f"{backend.name} generation", dtype)
            try:
                run = workers.take_or_compute((backend.name, case, dtype, dev, "generation"),
                                              lambda: generation_run(backend, case, dtype, dev))
            except BackendError as e:
                if "does not implement generation" in str(e):  # a gap, as a variant a backend lacks
                    out.status, out.message = "not implemented", str(e)
                else:
                    out.status, out.message = "error", f"{type(e).__name__}: {e}"
            except Exception as e:  # a crash is a failure of that backend, reported, not fatal
                out.status, out.message = "error", f"{type(e).__name__}: {e}"
            else:
                ref, greedy = reference_run(case, dtype), greedy_inputs(case, dtype)
                runs[backend.name], out.seconds = run, run.seconds
                V = spec.vocab_size
                out.checks = [compare(run.logits[..., :V], ref.logits[:1, :, :V], case=case.id, subject=backend.name,
                                      device=dev, dtype=dtype, quantity="logits", tensor="cached logits",
                                      names=(backend.name, "reference"))]
                out.verdicts = [judge_against_reference_greedy(spec, greedy.rounded, greedy.prompt, run.greedy,
                                                               dtype, greedy.new)]
        emit(out)
    if pairwise and runs:
        greedy = greedy_inputs(case, dtype)
        for a, b in combinations(runs, 2):
            dev = devices[a] if devices[a] == devices[b] else f"{devices[a]}/{devices[b]}"
            subject = f"{a}~{b}"
            check = compare(runs[a].logits[..., :spec.vocab_size], runs[b].logits[..., :spec.vocab_size],
                            case=case.id, subject=subject, device=dev, dtype=dtype, quantity="logits",
                            tensor="cached logits", pairwise=True, names=(a, b))
            verdict = judge_against_reference(spec, greedy.rounded, greedy.prompt, runs[a].greedy, runs[b].greedy,
                                              dtype)
            emit(Outcome(case.id, subject, dev, dtype, "ran", [check], synthetic=case.synthetic,
                         kind="generation", verdicts=[verdict]))
    return outcomes
