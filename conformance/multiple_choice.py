"""Multiple-choice answers (SPEC.md 23) judged against the float64 reference and across backends.

Two correct implementations can pick different endings: where the reference's scores of two
candidates are closer than the implementations' rounding errors, either answer is right. The rule is
that of greedy generation (conformance/generation.py), carried from one logit to a candidate's score.
Section 9's logits bound puts each backend logit within delta = bound(dtype, "logits", "rel_max") x
scale of the reference's, where scale is the largest |reference logit| at the example's scored
positions. A scored token's log-probability, its logit minus the row's log-sum-exp, then moves by at
most 2 delta; a candidate's summed loss over n tokens by 2 delta n, its average loss by 2 delta. So an
order the reference holds between candidates a and b can flip only when its gap is at most

    acc (summed):      2 delta (n_a + n_b)          acc_norm (average):   4 delta

and a differing answer is accepted exactly when the reference's own gap between the two answers is
within that. The threshold is the same for backend~reference and backend~backend: if A prefers a and
B prefers b, each within its bound of the reference, the reference's gap between a and b is within
the threshold. Each backend's summed losses are also checked against the reference's, candidate by
candidate (|loss - ref| <= 2 delta n, twice that between two backends).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable, Mapping, Sequence

import numpy as np

from ..evaluation import EvalResult, Example, evaluate
from ..evaluation.run import ExampleResult
from ..spec import ModelSpec, reference
from ..spec.checks import check_tokens_array
from ..spec.tolerance import bound
from .runner import backend_gap

KINDS = ("acc", "acc_norm")


@dataclass(frozen=True)
class ReferenceModel:
    spec: ModelSpec
    params: Mapping[str, np.ndarray]   # float64, already rounded to the dtype under test


class Float64Reference:
    """The float64 reference as a forward-only backend, for evaluate()."""
    name = "reference"

    def forward(self, model: ReferenceModel, tokens: np.ndarray) -> np.ndarray:
        check_tokens_array(model.spec, tokens)
        return reference.forward(model.spec, model.params, tokens)


def reference_model(spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str) -> ReferenceModel:
    """The reference on `params` as a backend holds them in `dtype` (SPEC.md 9: rounded, then exact)."""
    from ..weights import round_to_dtype

    return ReferenceModel(spec, {n: round_to_dtype(np.asarray(a, np.float32), dtype).astype(np.float64)
                                 for n, a in params.items()})


def tie_threshold(ref: ExampleResult, a: int, b: int, dtype: str, kind: str) -> float:
    """The largest gap between the reference's scores of candidates a and b that the logits bound
    cannot resolve (module docstring)."""
    delta = bound(dtype, "logits", "rel_max") * ref.scores.logit_scale
    if kind == "acc":
        return 2 * delta * (ref.scores.n_tokens[a] + ref.scores.n_tokens[b])
    return 4 * delta


def _values(result: ExampleResult, kind: str) -> tuple[float, ...]:
    return result.scores.losses if kind == "acc" else result.scores.avg_losses


def _answer(result: ExampleResult, kind: str) -> int:
    return result.pred if kind == "acc" else result.pred_norm


@dataclass(frozen=True)
class ChoiceVerdict:
    line: int
    kind: str                  # "acc" or "acc_norm"
    answers: tuple[int, int]   # (the first side's answer, the second's)
    gap: float = 0.0           # the reference's score of the first answer minus that of the second
    allowed: float = 0.0

    @property
    def same(self) -> bool:
        return self.answers[0] == self.answers[1]

    @property
    def ok(self) -> bool:
        return self.same or abs(self.gap) <= self.allowed

    def __str__(self) -> str:
        if self.same:
            return f"line {self.line} {self.kind}: both answer {self.answers[0]}"
        what = "a near-tie of the reference, accepted" if self.ok else "the reference tells them apart"
        return (f"line {self.line} {self.kind}: answers {self.answers[0]} vs {self.answers[1]}, reference score gap "
                f"{self.gap:.3g} against a tie threshold of {self.allowed:.3g}: {what}")


def judge(ref: ExampleResult, first: ExampleResult, second: ExampleResult, dtype: str, kind: str) -> ChoiceVerdict:
    """The answers of `first` and `second` (either may be the reference itself) judged on `ref`'s scores."""
    a, b = _answer(first, kind), _answer(second, kind)
    line = ref.example.line
    if a == b:
        return ChoiceVerdict(line, kind, (a, b))
    values = _values(ref, kind)
    return ChoiceVerdict(line, kind, (a, b), values[a] - values[b], tie_threshold(ref, a, b, dtype, kind))


def score_error_ratio(ref: ExampleResult, first: ExampleResult, second: ExampleResult, dtype: str,
                      pairwise: bool) -> float:
    """max over candidates of |first's summed loss - second's| / its bound 2 delta n (x 2 when pairwise)."""
    delta = bound(dtype, "logits", "rel_max", pairwise=pairwise) * ref.scores.logit_scale
    return max(abs(x - y) / (2 * delta * n) for x, y, n in
               zip(first.scores.losses, second.scores.losses, ref.scores.n_tokens))


@dataclass
class AgreementRow:
    subject: str                  # "torch" (against the reference) or "torch~mlx"
    dtype: str
    device: str = ""
    status: str = "ran"           # ran, unsupported, not implemented, error
    n: int = 0
    same: dict = field(default_factory=dict)          # kind -> examples with the same answer
    near_ties: dict = field(default_factory=dict)     # kind -> differing answers accepted as near-ties
    failures: list = field(default_factory=list)      # ChoiceVerdicts that fail
    score_ratio: float = 0.0      # worst score_error_ratio (<= 1 passes)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ran" and not self.failures and self.score_ratio <= 1.0

    @property
    def verdict(self) -> str:
        if self.status != "ran":
            return self.status
        return "pass" if self.ok else "FAIL"

    def to_dict(self) -> dict:
        return {"subject": self.subject, "dtype": self.dtype, "device": self.device, "status": self.status,
                "verdict": self.verdict, "n": self.n, "same": self.same, "near_ties": self.near_ties,
                "score_ratio": self.score_ratio, "failures": [str(v) for v in self.failures],
                "message": self.message}


def compare_results(subject: str, dtype: str, device: str, ref: EvalResult, first: EvalResult,
                    second: EvalResult, pairwise: bool) -> AgreementRow:
    """`first` against `second` (the reference, or another backend), example by example."""
    if not (ref.n == first.n == second.n):
        raise ValueError(f"results of {ref.n}, {first.n} and {second.n} examples: one evaluation of the same examples "
                         "each")
    row = AgreementRow(subject, dtype, device, n=ref.n, same={k: 0 for k in KINDS}, near_ties={k: 0 for k in KINDS})
    for r, x, y in zip(ref.examples, first.examples, second.examples):
        for kind in KINDS:
            v = judge(r, x, y, dtype, kind)
            if v.same:
                row.same[kind] += 1
            elif v.ok:
                row.near_ties[kind] += 1
            else:
                row.failures.append(v)
        row.score_ratio = max(row.score_ratio, score_error_ratio(r, x, y, dtype, pairwise))
    return row


def reference_results(spec: ModelSpec, params: Mapping[str, np.ndarray], examples: Sequence[Example], dtype: str,
                      pad_multiple: int = 1, on_example=None) -> EvalResult:
    return evaluate(Float64Reference(), reference_model(spec, params, dtype), examples, pad_multiple=pad_multiple,
                    on_example=on_example)


@dataclass
class Agreement:
    rows: list[AgreementRow]
    results: dict                  # (backend, dtype) -> EvalResult
    references: dict               # dtype -> the reference's EvalResult

    @property
    def ok(self) -> bool:
        return all(r.ok or r.status in ("unsupported", "not implemented") for r in self.rows)


def run_agreement(backends: Sequence, spec: ModelSpec, params: Mapping[str, np.ndarray], examples: Sequence[Example],
                  dtypes: Sequence[str], device: str | None = None, pad_multiple: int | None = None,
                  on_start: Callable[[str, str], None] | None = None,
                  on_row: Callable[[AgreementRow], None] | None = None,
                  on_example: Callable[[int, ExampleResult], None] | None = None) -> Agreement:
    """Every backend in every dtype against the float64 reference on weights rounded to that dtype,
    then every pair of backends. `params`: float32 (as a checkpoint holds them). A backend that lacks
    the spec or the dtype gets a row saying so; a crash is that backend's error row, not fatal."""
    from ..evaluation.run import PAD_MULTIPLE

    pad = PAD_MULTIPLE if pad_multiple is None else pad_multiple
    examples = list(examples)
    rows: list[AgreementRow] = []
    results: dict = {}
    references: dict = {}

    def emit(row: AgreementRow) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    for dtype in dtypes:
        if on_start:
            on_start("reference", dtype)
        ref = references[dtype] = reference_results(spec, params, examples, dtype, pad, on_example)
        ran: dict = {}
        for backend in backends:
            dev = device or backend.devices()[0]
            row = AgreementRow(backend.name, dtype, dev)
            gap = backend_gap(backend, spec, dtype, dev)
            if gap:
                row.status, row.message = gap
            else:
                if on_start:
                    on_start(backend.name, dtype)
                try:
                    model = backend.build(spec, params, dtype, dev)
                    got = evaluate(backend, model, examples, pad_multiple=pad, on_example=on_example)
                except Exception as e:  # a crash is a failure of that backend, reported, not fatal
                    row.status, row.message = "error", f"{type(e).__name__}: {e}"
                else:
                    results[backend.name, dtype] = ran[backend.name] = got
                    row = compare_results(backend.name, dtype, dev, ref, got, ref, pairwise=False)
            emit(row)
        for a, b in combinations(ran, 2):
            emit(compare_results(f"{a}~{b}", dtype, "", ref, ran[a], ran[b], pairwise=True))
    return Agreement(rows, results, references)
