"""Run backends against the float64 reference and against one another.

For a case and a dtype, the reference runs on the case's weights rounded to that dtype (the
values the backend holds), so what is measured is the backend's arithmetic, not the rounding
of its weights. Every installed backend then gives logits (forward), loss and all gradients
(loss_and_grads), and each tensor is checked under the tolerance policy.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from typing import Callable, Iterable

import numpy as np

from ..backends import Backend, get
from ..spec import param_table, reference
from ..weights import round_to_dtype
from .cases import Case
from .metrics import Check, compare

# Rough peak bytes per parameter of one check: float64 reference weights, activations and
# gradients, plus the backend's weights and gradients in float32.
BYTES_PER_PARAM = 48


@dataclass
class Outcome:
    case: str
    subject: str              # backend name, or "a~b" for a pair
    device: str
    dtype: str
    status: str               # "ran" | "error" | "unsupported" | "not run"
    checks: list[Check] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    synthetic: bool = True

    @property
    def ok(self) -> bool:
        """Failed checks and errors fail; a dtype a device cannot run is a visible gap, not a failure."""
        return self.status in ("unsupported", "not run") or (
            self.status == "ran" and all(c.ok for c in self.checks)
        )

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def worst(self, quantity: str) -> Check | None:
        checks = [c for c in self.checks if c.quantity == quantity]
        return max(checks, key=lambda c: c.worst_ratio) if checks else None


@dataclass
class Run:
    """One backend's answers for one case and dtype."""
    logits: np.ndarray
    loss: float
    grads: dict[str, np.ndarray]
    seconds: float


@dataclass
class Reference:
    spec: object
    tokens: np.ndarray
    targets: np.ndarray
    params: dict[str, np.ndarray]   # float32 weights as given to every backend
    logits: np.ndarray
    loss: float
    grads: dict[str, np.ndarray]
    synthetic: bool


@lru_cache(maxsize=1)
def reference_run(case: Case, dtype: str) -> Reference:
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    rounded = {n: round_to_dtype(a, dtype).astype(np.float64) for n, a in ckpt.params.items()}
    ref = reference.loss_and_grads(ckpt.spec, rounded, tokens, targets)
    return Reference(ckpt.spec, tokens, targets, ckpt.params, ref.logits, ref.loss, ref.grads, ckpt.synthetic)


def backend_run(backend: Backend, ref: Reference, dtype: str, device: str) -> Run:
    start = time.perf_counter()
    model = backend.build(ref.spec, ref.params, dtype, device)
    logits = backend.forward(model, ref.tokens)
    lg = backend.loss_and_grads(model, ref.tokens, ref.targets)
    return Run(logits, lg.loss, lg.grads, time.perf_counter() - start)


# The runs of the current (case, dtype), so that pairwise checks (and pytest's separate
# pairwise tests) reuse each backend's run instead of repeating it.
_runs: dict[tuple, Run] = {}


def cached_run(backend: Backend, case: Case, ref: Reference, dtype: str, device: str) -> Run:
    key = (backend.name, case, dtype, device)
    if key not in _runs:
        if any(k[1:3] != (case, dtype) for k in _runs):
            _runs.clear()
        _runs[key] = backend_run(backend, ref, dtype, device)
    return _runs[key]


def compare_runs(x: Run, y, *, case: str, subject: str, device: str, dtype: str, pairwise: bool,
                 names: tuple[str, str], param_names: Iterable[str]) -> list[Check]:
    """Checks of x against y (a Run or the Reference): logits, loss, then every gradient by name."""
    common = dict(case=case, subject=subject, device=device, dtype=dtype, pairwise=pairwise, names=names)
    checks = [
        compare(x.logits, y.logits, quantity="logits", tensor="logits", **common),
        compare(np.float64(x.loss), np.float64(y.loss), quantity="loss", tensor="loss", **common),
    ]
    expected = list(param_names)
    for name in expected:
        checks.append(compare(x.grads.get(name), y.grads.get(name), quantity="grads", tensor=name, **common))
    for name in sorted(set(x.grads) - set(expected)):
        checks.append(compare(x.grads[name], None, quantity="grads", tensor=name, **common))
    return checks


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run_case(
    backends: list[Backend], case: Case, dtype: str, device: str | None = None, pairwise: bool = True,
) -> list[Outcome]:
    """Every backend against the reference for one case and dtype, then every pair."""
    from ..spec import ModelSpec

    needed = ModelSpec.preset(case.preset).n_params * BYTES_PER_PARAM if case.synthetic else 0
    memory = _memory_bytes()
    if memory and needed > memory:
        msg = f"needs about {needed / 2**30:.0f} GiB of memory, this machine has {memory / 2**30:.0f} GiB"
        return [Outcome(case.id, b.name, device or "-", dtype, "not run", message=msg) for b in backends]

    ref = reference_run(case, dtype)
    names = [p.name for p in param_table(ref.spec)]
    outcomes, runs = [], {}
    for backend in backends:
        dev = device or backend.devices()[0]
        out = Outcome(case.id, backend.name, dev, dtype, "ran", synthetic=ref.synthetic)
        if dtype not in backend.dtypes(dev):
            out.status, out.message = "unsupported", f"{backend.name} does not run {dtype} on {dev}"
        else:
            try:
                run = cached_run(backend, case, ref, dtype, dev)
            except Exception as e:  # a crash is a failure of that backend, reported, not fatal
                out.status, out.message = "error", f"{type(e).__name__}: {e}"
            else:
                runs[backend.name] = run
                out.seconds = run.seconds
                out.checks = compare_runs(run, ref, case=case.id, subject=backend.name, device=dev,
                                          dtype=dtype, pairwise=False, names=(backend.name, "reference"),
                                          param_names=names)
        outcomes.append(out)
    if pairwise:
        devices = {o.subject: o.device for o in outcomes}
        for a, b in combinations(runs, 2):
            subject = f"{a}~{b}"
            dev = devices[a] if devices[a] == devices[b] else f"{devices[a]}/{devices[b]}"
            checks = compare_runs(runs[a], runs[b], case=case.id, subject=subject, device=dev, dtype=dtype,
                                  pairwise=True, names=(a, b), param_names=names)
            outcomes.append(Outcome(case.id, subject, dev, dtype, "ran", checks, synthetic=ref.synthetic))
    return outcomes


def run(
    backends: Iterable[str | Backend], cases: Iterable[Case], dtypes: Iterable[str] | None = None,
    device: str | None = None, pairwise: bool = True, on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """The suite: every case x dtype x backend (and pair). Dtypes default to all the spec defines."""
    from ..spec import DTYPES

    resolved = [get(b) if isinstance(b, str) else b for b in backends]
    outcomes = []
    for case in cases:
        for dtype in dtypes or DTYPES:
            for out in run_case(resolved, case, dtype, device, pairwise):
                outcomes.append(out)
                if on_outcome:
                    on_outcome(out)
    return outcomes
