"""Run backends against the float64 reference and against one another.

For a case and a dtype, the reference runs on the case's weights rounded to that dtype (the
values the backend holds), so what is measured is the backend's arithmetic, not the rounding
of its weights. Every installed backend then gives, in one pass, the logits, the loss and all
gradients (loss_and_grads, whose logits are those of the loss's forward) and the residual
statistics, and each tensor is checked under the tolerance policy. Where the spec keeps
weights unit-norm (nGPT), the post-step normalization is checked on its own as well: weights
pushed off the unit sphere, normalized in place by the backend, read back.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import combinations
from typing import Callable, Iterable, Mapping

import numpy as np

from ..backends import Backend, get
from ..spec import param_table, reference
from ..weights import round_to_dtype
from . import workers
from .cases import Case, exit_draws
from .metrics import Check, compare

# Rough peak bytes per parameter of one check: float64 reference weights, activations and
# gradients, plus the backend's weights and gradients in float32.
BYTES_PER_PARAM = 48
GAPS = ("unsupported", "not implemented", "not run")  # visible in the table, not failures


@dataclass
class Outcome:
    case: str
    subject: str              # backend name, or "a~b" for a pair
    device: str
    dtype: str
    status: str               # "ran" | "error" | one of GAPS
    checks: list[Check] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    synthetic: bool = True
    kind: str = "model"       # "model": forward, loss, gradients; "generation": the KV cache and greedy decoding
    verdicts: list = field(default_factory=list)  # generation: greedy continuations judged (GreedyVerdict)

    @property
    def ok(self) -> bool:
        """Failed checks and errors fail; a gap (dtype, variant or memory) is shown, not failed."""
        return self.status in GAPS or (self.status == "ran" and all(c.ok for c in self.checks)
                                       and all(v.ok for v in self.verdicts))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def worst(self, quantity: str) -> Check | None:
        """The check of `quantity` (its early-exit form included, e.g. exit_loss for loss) furthest from its bound."""
        checks = [c for c in self.checks if c.quantity in (quantity, EXIT_PREFIX + quantity)]
        return max(checks, key=lambda c: c.worst_ratio) if checks else None


@dataclass
class Run:
    """One backend's answers for one case and dtype."""
    logits: np.ndarray
    loss: float
    grads: dict[str, np.ndarray]
    seconds: float
    normalized: dict[str, np.ndarray] | None = None  # weights after the backend's normalize()
    stats: dict[str, np.ndarray] | None = None       # residual_stats (SPEC.md 18.4), gpt2 architecture


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
    draws: np.ndarray | None = None                  # loss="early_exit"'s uniforms (cases.exit_draws)
    perturbed: dict[str, np.ndarray] | None = None   # off-sphere weights for the normalization check
    normalized: dict[str, np.ndarray] | None = None  # the reference's normalization of them
    stats: dict[str, np.ndarray] | None = None       # residual_stats (SPEC.md 18.4) of the rounded weights
    kappa: Mapping[str, tuple] | None = None  # each checked tensor's condition estimates (SPEC.md 9)


def has_unit_norm_weights(spec) -> bool:
    return any(p.unit_norm_axis is not None for p in param_table(spec))


def perturb(spec, params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Push every unit-norm matrix off the sphere (rows and columns scaled unevenly, plus noise)."""
    rng = np.random.default_rng([seed, 11])
    out = dict(params)
    for p in param_table(spec):
        if p.unit_norm_axis is not None:
            w = params[p.name]
            rows = rng.uniform(0.5, 2.0, (w.shape[0], 1)).astype(np.float32)
            cols = rng.uniform(0.5, 2.0, (1, w.shape[1])).astype(np.float32)
            out[p.name] = w * rows * cols + np.float32(0.05) * rng.standard_normal(w.shape, dtype=np.float32)
    return out


def _frozen(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # the reference is shared by every backend of a case: one that wrote into the arrays it was
    # given (a model aliasing them, normalized in place) would corrupt the next backend's input
    for a in params.values():
        a.setflags(write=False)
    return params


class Conditioning(Mapping):
    """A case's condition estimates, computed on first use (the KV-cache and greedy checks, which share the
    reference, never use them: for the gpt2 shapes that saves ~7 passes of the reference)."""

    def __init__(self, case: Case):
        self.case = case

    def _estimates(self) -> dict:
        return conditioning(self.case)

    def __getitem__(self, name):
        return self._estimates()[name]

    def __iter__(self):
        return iter(self._estimates())

    def __len__(self) -> int:
        return len(self._estimates())


@lru_cache(maxsize=8)  # a few numbers per tensor: tests that come back to a case find them
def conditioning(case: Case) -> dict[str, tuple[float, float]]:
    """The condition estimate of every tensor the case's checks compare (SPEC.md 9), once per case: it does
    not depend on the dtype (a bound is c x u(dtype) x kappa), so every dtype and backend of the case shares it."""
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    draws = exit_draws(ckpt.spec, ckpt.params, tokens, case.seed)
    off_sphere = perturb(ckpt.spec, ckpt.params, case.seed) if has_unit_norm_weights(ckpt.spec) else None
    return reference.condition(ckpt.spec, ckpt.params, tokens, targets, draws, off_sphere, seed=case.seed)


@lru_cache(maxsize=1)
def reference_run(case: Case, dtype: str) -> Reference:
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    draws = exit_draws(ckpt.spec, ckpt.params, tokens, case.seed)
    rounded = {n: round_to_dtype(a, dtype).astype(np.float64) for n, a in ckpt.params.items()}
    ref = reference.loss_and_grads(ckpt.spec, rounded, tokens, targets, draws)
    out = Reference(ckpt.spec, tokens, targets, _frozen(ckpt.params), ref.logits, ref.loss, ref.grads, ckpt.synthetic,
                    draws=draws, kappa=Conditioning(case))
    if ckpt.spec.architecture == "gpt2":
        out.stats = reference.residual_stats(ckpt.spec, rounded, tokens)
    del rounded, ref  # the float64 weights, before the off-sphere copies are made
    if has_unit_norm_weights(ckpt.spec):
        out.perturbed = _frozen(perturb(ckpt.spec, ckpt.params, case.seed))
        rounded = {n: round_to_dtype(a, dtype) for n, a in out.perturbed.items()}
        out.normalized = reference.normalize_weights(ckpt.spec, rounded)
    return out


def backend_run(backend: Backend, ref: Reference, dtype: str, device: str) -> Run:
    """One pass of the backend's model: the logits checked are those of its loss's forward, and the
    residual statistics (SPEC.md 18.4, architecture gpt2) come with them where the backend can."""
    start = time.perf_counter()
    model = backend.build(ref.spec, ref.params, dtype, device)
    lg = backend.loss_and_grads(model, ref.tokens, ref.targets, ref.draws, stats=ref.spec.architecture == "gpt2")
    run = Run(lg.logits, lg.loss, lg.grads, time.perf_counter() - start, stats=lg.stats)
    del model, lg  # one model's weights at a time: this one goes before the off-sphere one is built
    if ref.perturbed is not None:
        model = backend.build(ref.spec, ref.perturbed, dtype, device)
        backend.normalize(model)
        run.normalized = backend.state(model)
    return run


# The runs of the current (case, dtype), so that pairwise checks (and pytest's separate
# pairwise tests) reuse each backend's run instead of repeating it.
_runs: dict[tuple, Run] = {}


def cached_run(backend: Backend, case: Case, ref: Reference, dtype: str, device: str) -> Run:
    """The backend's run of (case, dtype, device): cached, else taken from the suite's worker process
    where it computes it (conformance/workers.py), else computed here."""
    key = (backend.name, case, dtype, device)
    if key not in _runs:
        if any(k[1:3] != (case, dtype) for k in _runs):
            _runs.clear()
        _runs[key] = workers.take_or_compute((*key, "model"), lambda: backend_run(backend, ref, dtype, device))
    return _runs[key]


def release() -> None:
    """Forget the cached runs and the reference of the last (case, dtype): when the suite moves on,
    their gradients and the float64 answers need not live on beside the next case's."""
    _runs.clear()
    reference_run.cache_clear()  # (the case's condition estimates stay: a few numbers, shared by its dtypes)


# SPEC.md 9: the early-exit loss and its gradients are worse conditioned than the cross-entropy (their
# relative error is the logits' absolute error), so they are measured and bounded as quantities of their own
EXIT_PREFIX = "exit_"


def compare_runs(x: Run, y, *, case: str, subject: str, device: str, dtype: str, pairwise: bool,
                 names: tuple[str, str], param_names: Iterable[str], spec=None,
                 kappa: dict[str, tuple[float, float]] | None = None) -> list[Check]:
    """Checks of x against y (a Run or the Reference): logits, loss, every gradient by name, the
    residual statistics and the normalized weights where there are any. Each tensor's bound rests on its
    condition estimate (SPEC.md 9) where `kappa` (default: the Reference's) names it."""
    spec = spec if spec is not None else getattr(y, "spec", None)
    kappa = kappa if kappa is not None else getattr(y, "kappa", None) or {}
    prefix = EXIT_PREFIX if spec is not None and spec.loss == "early_exit" else ""

    def check(got, want, quantity, tensor):
        return compare(got, want, case=case, subject=subject, device=device, dtype=dtype, pairwise=pairwise,
                       names=names, quantity=quantity, tensor=tensor, kappa=kappa.get(tensor))

    checks = [check(x.logits, y.logits, "logits", "logits"),
              check(np.float64(x.loss), np.float64(y.loss), prefix + "loss", "loss")]
    expected = list(param_names)
    for name in expected:
        checks.append(check(x.grads.get(name), y.grads.get(name), prefix + "grads", name))
    for name in sorted(set(x.grads) - set(expected)):
        checks.append(check(x.grads[name], None, prefix + "grads", name))
    if y.stats is not None:
        got = x.stats or {}
        for name in y.stats:
            checks.append(check(got.get(name), y.stats[name], "stats", f"residual {name}"))
    if y.normalized is not None:
        got = x.normalized or {}
        for name in expected:
            checks.append(check(got.get(name), y.normalized[name], "weights", f"normalized {name}"))
    return checks


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_gap(case: Case) -> str | None:
    """Why the case cannot run on this machine's memory, or None."""
    needed = case.spec.n_params * BYTES_PER_PARAM if case.synthetic else 0
    memory = _memory_bytes()
    if memory and needed > memory:
        return f"needs about {needed / 2**30:.0f} GiB of memory, this machine has {memory / 2**30:.0f} GiB"
    return None


def backend_gap(backend: Backend, spec, dtype: str, dev: str) -> tuple[str, str] | None:
    """(status, message) when `backend` cannot run `spec` in `dtype` on `dev` (a gap in the table, not a
    failure): "not implemented" for an option it lacks, "unsupported" for a dtype its device lacks; else None."""
    missing = backend.unsupported(spec)
    if missing:
        return "not implemented", missing
    if dtype not in backend.dtypes(dev):
        return "unsupported", f"{backend.name} does not run {dtype} on {dev}"
    return None


# on_start(case_id, subject, dtype): called before each long step (the reference, each backend), for progress
OnStart = Callable[[str, str, str], None]


def run_case(
    backends: list[Backend], case: Case, dtype: str, device: str | None = None, pairwise: bool = True,
    on_start: OnStart | None = None, on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Every backend against the reference for one case and dtype, then every pair; each outcome
    goes to `on_outcome` as soon as it is known."""
    started = on_start or (lambda case_id, subject, dtype: None)
    outcomes: list[Outcome] = []

    def emit(out: Outcome) -> None:
        outcomes.append(out)
        if on_outcome:
            on_outcome(out)

    too_big = memory_gap(case)
    if too_big:
        for b in backends:
            emit(Outcome(case.id, b.name, device or "-", dtype, "not run", message=too_big))
        return outcomes

    spec = case.spec
    names = [p.name for p in param_table(spec)]
    # the reference (minutes for the large presets) only when some backend will run against it
    runnable = [b for b in backends if not b.unsupported(spec)
                and dtype in b.dtypes(device or b.devices()[0])]
    if runnable:
        started(case.id, "reference", dtype)
    ref = reference_run(case, dtype) if runnable else None
    runs = {}
    for backend in backends:
        dev = device or backend.devices()[0]
        out = Outcome(case.id, backend.name, dev, dtype, "ran", synthetic=case.synthetic)
        gap = backend_gap(backend, spec, dtype, dev)
        if gap:
            out.status, out.message = gap
        else:
            try:
                started(case.id, backend.name, dtype)
                run = cached_run(backend, case, ref, dtype, dev)
            except Exception as e:  # a crash is a failure of that backend, reported, not fatal
                out.status, out.message = "error", f"{type(e).__name__}: {e}"
            else:
                runs[backend.name] = run
                out.seconds = run.seconds
                out.checks = compare_runs(run, ref, case=case.id, subject=backend.name, device=dev,
                                          dtype=dtype, pairwise=False, names=(backend.name, "reference"),
                                          param_names=names)
        emit(out)
    if pairwise:
        devices = {o.subject: o.device for o in outcomes}
        for a, b in combinations(runs, 2):
            subject = f"{a}~{b}"
            dev = devices[a] if devices[a] == devices[b] else f"{devices[a]}/{devices[b]}"
            checks = compare_runs(runs[a], runs[b], case=case.id, subject=subject, device=dev, dtype=dtype,
                                  pairwise=True, names=(a, b), param_names=names, spec=spec, kappa=ref.kappa)
            emit(Outcome(case.id, subject, dev, dtype, "ran", checks, synthetic=case.synthetic))
    return outcomes


def run(
    backends: Iterable[str | Backend], cases: Iterable[Case], dtypes: Iterable[str] | None = None,
    device: str | None = None, pairwise: bool = True, on_outcome: Callable[[Outcome], None] | None = None,
    on_start: OnStart | None = None, generation: Iterable[Case] = (), worker_processes: int | None = None,
    training: Iterable[tuple] = (),
) -> list[Outcome]:
    """The suite: every case x dtype x backend (and pair). Dtypes default to all the spec defines.
    `generation`: the cases (of `cases`) whose KV cache and greedy decoding are checked too
    (conformance/generation.py, e.g. generation_cases(cases)), each right after its case's own rows,
    so that the reference is reused. `training`: (TrajectoryCase, precision) pairs whose training
    trajectories follow (conformance/trajectory.py run_trajectory). `on_outcome` gets each outcome as it
    is known, `on_start` each long step as it begins. tinygrad's runs (model, generation and training)
    are computed in worker processes beside this one (conformance/workers.py; the same results):
    `worker_processes` of them at most (default $GPTSPEC_CONFORMANCE_WORKERS, else
    workers.DEFAULT_WORKERS; 0: none, everything in this process)."""
    from ..spec import DTYPES
    from .generation import run_generation
    from .trajectory import reference_trajectory, run_trajectory, trajectory_from_reference

    resolved = [get(b) if isinstance(b, str) else b for b in backends]
    cases, dtypes, generating, training = list(cases), list(dtypes or DTYPES), set(generation), list(training)
    outcomes = []
    count = workers.worker_count(worker_processes)
    offloaded = workers.offloaded(resolved, count)
    # While the main process waits for a worker (whose first runs compile every kernel), it does work it
    # needs later anyway (chores), each kept until the suite reaches it: the condition estimates of the cases
    # to come, then the offloaded backends' training runs too large for a worker (_plan). Waiting for a large
    # case's run, it holds that case's reference and runs: then only the chores marked to run beside them (the
    # third field). In a suite with a large case, the worker is the longer process (gpt2's model runs are its
    # own), so its small training runs become such chores, as do the large training runs of the reference and
    # then of the other backends (from the reference's inputs), which would otherwise come after the worker's
    # last run, where the machine's memory holds them beside (BESIDE_TRAINING_MEMORY; docs/tinygrad.md 4).
    def worker_run(b, item, beside=False):  # one of a worker's runs, as a chore of this process
        return (b.name, *item), partial(workers.compute, b, *item, {}), beside

    plans, beside, waits_for_large = [], [], False
    for b in offloaded:
        model_runs, small_training = _plan(b, cases, dtypes, device, generating), _training_plan(b, training, device)
        if any(_large(item[0]) for item in model_runs):
            waits_for_large = True
            beside += [worker_run(b, item, beside=True) for item in small_training]
            small_training = []
        plans += [(b.name, plan) for plan in workers.split(model_runs + small_training, count)]
    memory = _memory_bytes()
    if waits_for_large and (memory is None or memory >= BESIDE_TRAINING_MEMORY):
        beside += [(("reference", case, precision), partial(reference_trajectory, case, precision), True)
                   for case, precision in training if _large(case) and case.spec.n_params <= AHEAD_PARAMS
                   and _trains(case, precision)]
        beside += [((b.name, *item), partial(trajectory_from_reference, b, *item[:3]), True)
                   for b in resolved if b not in offloaded for item in _training_plan(b, training, device, ahead=True)]
    chores = [(None, partial(conditioning, case), not _large(case))
              for case in cases[:conditioning.cache_info().maxsize]
              if not memory_gap(case) and case.spec.n_params <= AHEAD_PARAMS] if plans else []
    chores += [worker_run(b, item) for b in offloaded for item in _training_plan(b, training, device, ahead=True)]
    chores += beside
    offload = workers.Offload(plans, chores, lambda key: not _large(key[1]))
    workers.current = offload
    try:
        with workers.sharing_cores(offload.processes, resolved):
            for case in cases:
                for dtype in dtypes:
                    outcomes += run_case(resolved, case, dtype, device, pairwise, on_start, on_outcome)
                    if case in generating:
                        outcomes += run_generation(resolved, case, dtype, device, pairwise, on_start, on_outcome)
                    release()
            for case, precision in training:
                if on_start:
                    on_start(case.id, "training", precision)
                outcomes += run_trajectory(resolved, case, precision, device, pairwise, on_outcome)
    finally:  # Ctrl-C or a crash here ends the worker too
        workers.current = None
        offload.close()
    return outcomes


def _plan(backend: Backend, cases: list[Case], dtypes: list[str], device: str | None, generating=frozenset(),
          training: Iterable[tuple] = ()) -> list[tuple]:
    """The (case, dtype, device, kind) runs of `backend` that the suite will ask for, in the suite's order:
    its model runs, its generation runs (the cases of `generating`) and its training runs (`training`, the
    dtype being the precision). A training run whose inputs need the float64 reference (the early-exit
    loss's draws) or whose memory would add to the reference's (WORKER_TRAINING_PARAMS) is left to the main
    process, as is everything run_case or run_trajectory would not run."""
    dev = device or backend.devices()[0]
    plan = []
    for case in cases:
        if memory_gap(case):
            continue
        for dtype in dtypes:
            if not backend_gap(backend, case.spec, dtype, dev):
                plan.append((case, dtype, dev, "model"))
                if case in generating:
                    plan.append((case, dtype, dev, "generation"))
    return plan + _training_plan(backend, training, device)


def _trains(case, precision: str) -> bool:
    """Whether run_trajectory trains `case` in `precision` on this machine (else its rows say why not)."""
    return not memory_gap(case.model_case) and precision in case.precisions


def _large(case) -> bool:
    """Whether a case (a model or training case) is beyond what a worker trains (WORKER_TRAINING_PARAMS)."""
    return case.spec.n_params > WORKER_TRAINING_PARAMS


def _training_plan(backend: Backend, training: Iterable[tuple], device: str | None, ahead: bool = False) -> list:
    """The (case, precision, device, "trajectory") training runs of `backend` for a worker, or, `ahead`,
    those too large for one (WORKER_TRAINING_PARAMS) that the main process can compute while it waits
    (up to AHEAD_PARAMS)."""
    from .trajectory import trains

    dev = device or backend.devices()[0]
    plan = []
    for case, precision in training:
        if (not _trains(case, precision) or backend.unsupported(case.spec) or not trains(backend)
                or case.spec.loss == "early_exit"):
            continue
        size = case.spec.n_params
        if (WORKER_TRAINING_PARAMS < size <= AHEAD_PARAMS) if ahead else size <= WORKER_TRAINING_PARAMS:
            plan.append((case, precision, dev, "trajectory"))
    return plan


# The work done ahead while waiting for a worker (run's chores): up to the gpt2 shapes, whose condition estimate
# (~4 GB at its peak) and tinygrad training run (~9 GB at its peak, 1.5 GB kept) fit beside the small case's run
# the main process holds while it waits; a larger model's would add to the large case it may be holding.
AHEAD_PARAMS = 130_000_000

# The memory a machine needs for the large training runs (the reference's, then torch's and MLX's) to be done
# while the main process holds gpt2's model case (run's chores): the run's peak, all processes, is then 18.7 GB
# (17.4 GiB), against 12.8 GB with them after the worker's last run, which ends the run ~20 s later
# (docs/tinygrad.md 4).
BESIDE_TRAINING_MEMORY = 20 << 30

# Larger training runs stay in the main process, where they never overlap the float64 reference's training
# run: in the worker, tinygrad's gpt2 training (its model, AdamW state and the state it hands back, ~9 GB at
# the peak) coincided with the main process's reference trajectory (~11.7 GB), and the run's peak, all
# processes, went from 14.4 GB to 20.5 GB on a 24 GB machine, for no gain (279-285 s against 271 s).
WORKER_TRAINING_PARAMS = 20_000_000
