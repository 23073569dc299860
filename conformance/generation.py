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
"""
from __future__ import annotations

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
