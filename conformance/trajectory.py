"""Trajectory conformance (SPEC.md 20.11): the same training run in every backend and the float64 reference.

A trajectory case is a model (a ModelSpec preset and variant, synthetic "conformance" weights of a
seed, rounded to float32: the master weights every backend starts from), a TrainSpec, and N steps of
grad_accum micro-batches (and, for loss="early_exit", their draws), the same for everyone. Each
backend trains with its framework's own optimizer (Backend.train); the float64 reference
(spec.reference.train) runs the same steps. Compared, under bounds per precision, quantity and step
count (spec/tolerance.py, `trajectory_bound`):

- per step s = 1..N: the loss and the global gradient norm before clipping (relative error);
- after step k for every k in the case's checkpoints (1 and N): every tensor's weight *change*
  dw = w_k - w_0 (rel_l2 = ||dw - dw_ref|| / ||dw_ref||, rel_max = max|dw - dw_ref| / max|dw_ref|),
  and the moments m and v (the same metrics on the moments themselves).

Why the change and not the weights: after a few steps the weights have moved by ~N*lr, a small
fraction of their size, so ||w - w_ref|| / ||w|| would divide the error of the training by the size
of the initialization and let a wrong step through. Elements whose exact gradient is zero (the key
bias under softmax attention: softmax is invariant to a per-query constant) are excluded from the
weight-change checks: Adam turns the rounding noise of their gradient into an update of arbitrary
sign (~lr * g / (|g| + eps)), and since the loss does not depend on them no value is wrong. SPEC.md
20.11 gives the measurements behind both choices.

The backend's run is taken in segments ending at the checkpoints, resumed through the optimizer
state (Backend.train(..., state=)), so the state after step 1 is read without a second run.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import combinations
from typing import Callable, Iterable, Sequence

import numpy as np

from ..backends import Backend, get
from ..spec import IGNORE_INDEX, ModelSpec, param_table, reference
from ..spec.reference.training import TrainState, train_step
from ..spec.variants import VARIANTS
from ..spec.tolerance import (METRICS, TRAJECTORY_QUANTITIES, trajectory_bound, trajectory_conditioned_bound,
                              trajectory_is_conditioned)
from ..spec.train import PRECISIONS, TrainSpec
from ..weights import round_to_dtype
from .cases import Case, exit_draws
from .metrics import Check, compare
from . import workers
from .runner import Outcome, memory_gap

TIERS = ("default", "heavy")
# Every micro-batch skips its own share of targets, different per micro-batch, so that the mean of the
# micro-batch means (SPEC.md 20.4) differs from the mean over the step's counted targets.
_IGNORE_EVERY = (7, 3, 5, 4)


@dataclass(frozen=True)
class TrajectoryCase:
    preset: str
    seed: int = 0
    batch: int = 2              # per micro-batch
    length: int = 16
    steps: int = 4
    variant: str = "gpt2"
    precisions: tuple[str, ...] = PRECISIONS
    accum: int = 2              # micro-batches per step

    @property
    def id(self) -> str:
        prefix = "" if self.variant == "gpt2" else f"{self.variant}:"
        return (f"{prefix}{self.preset}/seed{self.seed}/B{self.batch}xT{self.length}"
                f"x{self.train_spec().grad_accum}/N{self.steps}")

    @property
    def model_case(self) -> Case:
        """The forward suite's case of the same model and weights (its checkpoint, its memory estimate)."""
        return Case(self.preset, self.seed, self.batch, self.length, variant=self.variant)

    @property
    def spec(self) -> ModelSpec:
        return self.model_case.spec

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The steps after which the weights and moments are compared."""
        return tuple(sorted({1, self.steps}))

    def train_spec(self, precision: str = "float32") -> TrainSpec:
        return recipe(self.spec, self.steps, self.accum).replace(precision=precision)

    def params(self) -> dict[str, np.ndarray]:
        """The float32 master weights every backend and the reference start from."""
        return {n: np.asarray(a, np.float32) for n, a in self.model_case.checkpoint().params.items()}

    def batches(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """batches[i][k]: micro-batch k (tokens, targets) of step i, int64 (B, T)."""
        spec, ts = self.spec, self.train_spec()
        rng = np.random.default_rng([self.seed, 17])
        out = []
        for _ in range(self.steps):
            step = []
            for k in range(ts.grad_accum):
                tokens = rng.integers(0, spec.vocab_size, (self.batch, self.length), dtype=np.int64)
                targets = rng.integers(0, spec.vocab_size, (self.batch, self.length), dtype=np.int64)
                every = _IGNORE_EVERY[k % len(_IGNORE_EVERY)]
                targets.reshape(-1)[k % every::every] = IGNORE_INDEX
                step.append((tokens, targets))
            out.append(step)
        return out


def recipe(spec: ModelSpec, steps: int, accum: int = 2) -> TrainSpec:
    """The training run of a trajectory case: every branch of the step within a few steps.

    build-nanogpt's GPT-2 settings (betas (0.9, 0.95), decay 0.1 on ndim >= 2, clipping at 1.0, a
    warmup then the cosine to 10%) at lr 1e-3, `accum` micro-batches per step; the schedule is short
    enough that N steps cover the warmup (at lr/2, then lr), the cosine and the floor. nGPT: its own
    step (SPEC.md 20.8): no decay, no warmup.
    """
    warmup = min(2, steps)
    common = dict(lr=1e-3, schedule="cosine", betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, grad_accum=accum)
    if spec.architecture == "ngpt":
        return TrainSpec(**common, max_steps=max(1, steps - 1), warmup_steps=0, weight_decay=0.0, decay="none")
    return TrainSpec(**common, max_steps=max(warmup, steps - 1), warmup_steps=warmup, weight_decay=0.1)


# The variants whose training the default tier proves: GPT-2, nGPT (its normalization in the step),
# learned sinks (a parameter of its own), early exit (draws per step), seed 002's best form.
KEY_VARIANTS = ("gpt2", "ngpt", "learned_sinks", "early-exit", "seed002-axm")


def small_trajectory_cases(seeds=(0,), steps: int = 4, variants=KEY_VARIANTS) -> list[TrajectoryCase]:
    """test-tiny for GPT-2 alone (one layer, the whole context), test-mini (two layers) for every variant."""
    out = []
    for variant in variants:
        for s in seeds:
            if variant == "gpt2":
                out.append(TrajectoryCase("test-tiny", s, batch=2, length=16, steps=steps, variant=variant))
            out.append(TrajectoryCase("test-mini", s, batch=2, length=32, steps=steps, variant=variant))
    return out


def trajectory_cases(tier: str = "default", variants: Iterable[str] | None = None) -> list[TrajectoryCase]:
    """The suite's trajectory cases; `variants` narrows them, and a variant named there trains even when
    it is not one of KEY_VARIANTS (every variant trains: `--variant softmax1` runs softmax1's trajectory).

    default: 4 steps of GPT-2 (test-tiny) and nGPT (test-mini) in both precisions, of learned sinks, early
    exit and seed 002's form (test-mini) in float32, and one step of the full gpt2 shapes in float32. Kept
    small because tinygrad compiles every new model's step (a minute or two on two CPU cores). A variant
    named outside KEY_VARIANTS: 4 steps on test-mini in float32.
    heavy: 50 steps of every key variant on both small configs over two seeds in both precisions, 4 steps
    of every other variant on test-mini in both precisions, and 4 steps of the full gpt2 shapes in float32."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {TIERS}")
    named = None if variants is None else set(variants)
    unknown = sorted((named or set()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; gptspec variants lists them")
    chosen = tuple(v for v in KEY_VARIANTS if named is None or v in named)
    others = tuple(v for v in VARIANTS if v not in KEY_VARIANTS and (named is not None and v in named
                                                                      or named is None and tier == "heavy"))
    if tier == "heavy":
        out = small_trajectory_cases((0, 1), 50, chosen)
        out += [c for c in small_trajectory_cases((0,), 4, others) if c.preset == "test-mini"]
        if "gpt2" in chosen:
            out.append(TrajectoryCase("gpt2", 0, batch=1, length=64, steps=4, precisions=("float32",), accum=1))
        return out
    out = []
    for case in small_trajectory_cases((0,), 4, chosen + others):
        if case.variant == "gpt2" and case.preset == "test-tiny" or case.variant == "ngpt":
            out.append(case)
        elif case.variant != "gpt2":
            out.append(dataclasses.replace(case, precisions=("float32",)))
    if "gpt2" in chosen:
        # one micro-batch: the float64 reference's step on 124M parameters takes most of the time
        out.append(TrajectoryCase("gpt2", 0, batch=1, length=32, steps=1, precisions=("float32",), accum=1))
    return out


# -- the runs ---------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """One run's answers: per step the loss, the pre-clip norm and the lr; the state at each checkpoint."""
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    states: dict[int, TrainState] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class ReferenceTrajectory(Trajectory):
    spec: ModelSpec | None = None
    train_spec: TrainSpec | None = None
    initial: dict[str, np.ndarray] = field(default_factory=dict)   # the float32 starting weights
    batches: list = field(default_factory=list)
    draws: list | None = None                                      # draws[i][k], loss="early_exit" only
    null: dict[str, np.ndarray] = field(default_factory=dict)      # name -> mask of zero-gradient elements
    kappa: dict | None = None  # (quantity, check tensor) -> the condition estimates of its checks (SPEC.md 9, 20.11)


def _compute_weights(train_spec: TrainSpec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the forward reads (SPEC.md 20.9): the master weights, through float32 to bfloat16 when mixed."""
    if train_spec.precision == "float32":
        return params
    return {n: round_to_dtype(np.asarray(a, np.float32), "bfloat16").astype(np.float64) for n, a in params.items()}


def _step_draws(spec, train_spec, state: TrainState, micro_batches, seed: int, it: int):
    """loss="early_exit"'s draws for one step, kept away from the exit probabilities of the weights the
    step reads (the reference's at that step), so that no backend's rounding can flip an exit."""
    weights = _compute_weights(train_spec, state.params)
    return [exit_draws(spec, weights, tokens, seed * 1000 + it * 10 + k)
            for k, (tokens, _) in enumerate(micro_batches)]


def null_elements(state: TrainState) -> dict[str, np.ndarray]:
    """The elements whose exact gradient is zero, found from the reference's first moment after step 1
    (m = (1 - beta1) g, g the clipped float64 gradient): below 1e-12 of its tensor's largest element, it is
    rounding noise (SPEC.md 20.11; GPT-2 under softmax attention: the key bias). Masks only for tensors
    that hold such elements beside others."""
    out = {}
    for name, m in state.m.items():
        a = np.abs(m)
        scale = a.max(initial=0.0)
        mask = a <= 1e-12 * scale
        if scale > 0 and mask.any():
            out[name] = mask
    return out


@lru_cache(maxsize=2)
def reference_trajectory(case: TrajectoryCase, precision: str) -> ReferenceTrajectory:
    spec, ts = case.spec, case.train_spec(precision)
    start = time.perf_counter()
    initial = case.params()
    for a in initial.values():  # shared by every backend of the case: nobody may write into it
        a.setflags(write=False)
    batches = case.batches()
    out = ReferenceTrajectory(spec=spec, train_spec=ts, initial=initial, batches=batches)
    state = TrainState.initial(spec, initial)
    exits = spec.loss == "early_exit"
    out.draws = [] if exits else None
    for i, micro_batches in enumerate(batches):
        draws = _step_draws(spec, ts, state, micro_batches, case.seed, i) if exits else None
        # in place: `state` is this run's own (reference.train would copy it, 3 GB a step on gpt2 shapes)
        loss, norm, lr = train_step(spec, ts, state, micro_batches, draws)
        out.losses.append(loss)
        out.grad_norms.append(norm)
        out.lrs.append(lr)
        if exits:
            out.draws.append(draws)
        if i == 0:
            out.null = null_elements(state)
        if i + 1 in case.checkpoints:
            out.states[i + 1] = state.copy() if i + 1 < case.steps else state
    if spec.n_params <= CONDITIONED_PARAMS:
        out.kappa = trajectory_conditioning(case, out)
    out.seconds = time.perf_counter() - start
    return out


# The estimate holds a perturbed training state beside the exact outputs (~10 float64 copies of the weights):
# for the gpt2-shaped one-step case that is ~10 GB on top of the run's own, so larger models keep the
# per-horizon bounds (SPEC.md 20.11)
CONDITIONED_PARAMS = 20_000_000


def trajectory_conditioning(case: TrajectoryCase, ref: ReferenceTrajectory, samples: int = 4) -> dict:
    """Every trajectory check's condition estimate (SPEC.md 9): the reference's training run repeated with every
    operation randomly rounded (spec/reference/conditioning.py), from the same weights, batches and draws; its
    errors per step (loss, gradient norm) and at each checkpoint (weight change, moments), in units of the
    perturbation. The estimate follows the errors through the steps, so the bound of step 4 grows as its
    errors do, without a constant per step horizon."""
    from ..spec.reference import conditioning

    table = [p.name for p in param_table(ref.spec)]
    initial = {n: np.asarray(a, np.float64) for n, a in ref.initial.items()}

    def compute(perturbed: bool) -> dict:
        state = TrainState.initial(ref.spec, conditioning.noisy(initial) if perturbed else initial)
        out = {}
        for i, micro_batches in enumerate(ref.batches):
            draws = None if ref.draws is None else [ref.draws[i]]
            r = reference.train(ref.spec, ref.train_spec, state, [micro_batches], draws)
            state, s = r.state, i + 1
            out[("train_loss", f"step {s}")] = r.losses[0]
            out[("train_grad_norm", f"step {s}")] = r.grad_norms[0]
            if s in ref.states:
                for name in table:
                    keep = None if name not in ref.null else ~ref.null[name]
                    out[("train_weights", f"step {s}: {name}")] = _change(state, initial, name, keep)
                    out[("train_m", f"step {s}: {name}")] = state.m[name]
                    out[("train_v", f"step {s}: {name}")] = state.v[name]
        return out

    return conditioning.estimate(compute, samples, seed=[case.seed, 20])


def backend_trajectory(backend: Backend, case: TrajectoryCase, ref: ReferenceTrajectory, device: str) -> Trajectory:
    """The backend's run of the case: built in float32 from the starting weights, trained in segments
    that end at the case's checkpoints, each resumed from the previous one's optimizer state."""
    start = time.perf_counter()
    model = backend.build(ref.spec, ref.initial, "float32", device)
    out, state, done = Trajectory(), None, 0
    for k in case.checkpoints:
        draws = None if ref.draws is None else ref.draws[done:k]
        # float32: the backend's own precision, exactly, in half the memory of float64
        r = backend.train(model, ref.train_spec, ref.batches[done:k], draws, state=state, state_dtype="float32")
        out.losses += list(r.losses)
        out.grad_norms += list(r.grad_norms)
        out.lrs += list(r.lrs)
        state = r.state
        out.states[k] = state
        done = k
    out.seconds = time.perf_counter() - start
    return out


def trajectory_from_reference(backend: Backend, case: TrajectoryCase, precision: str, device: str) -> Trajectory:
    """The backend's run of the case as run_trajectory computes it in this process: from the float64 reference's
    starting weights and batches (reference_trajectory keeps its recent runs, so a chore that follows the
    reference's own reuses them)."""
    return backend_trajectory(backend, case, reference_trajectory(case, precision), device)


# The runs of the current (case, precision), so that pairwise checks (and pytest's separate pairwise
# tests) reuse each backend's run instead of repeating it.
_runs: dict[tuple, Trajectory] = {}


def cached_trajectory(backend: Backend, case: TrajectoryCase, ref: ReferenceTrajectory, precision: str,
                      device: str) -> Trajectory:
    key = (id(backend), backend.name, case, precision, device)  # by instance: a substituted backend runs anew
    if key not in _runs:
        if any(k[2:4] != (case, precision) for k in _runs):
            _runs.clear()
        # from the suite's worker process where it trains this backend (conformance/workers.py), else here
        _runs[key] = workers.take_or_compute((backend.name, case, precision, device, "trajectory"),
                                             lambda: backend_trajectory(backend, case, ref, device))
    return _runs[key]


def trains(backend: Backend) -> bool:
    """Whether the backend wrote the training hooks (the base's raise "does not implement training")."""
    return type(backend)._train_step is not Backend._train_step


# -- the checks -------------------------------------------------------------------------------------
def _check(x, ref, *, precision: str, steps: int, quantity: str, pairwise: bool, kappa=None, **labels) -> Check:
    """compare()'s metrics and failure notes, under the check's conditioned bound (SPEC.md 9: c x u x kappa)
    where its condition estimate `kappa` is known and the policy holds the constants, else under the
    trajectory bound of (precision, steps, quantity)."""
    if kappa is not None and trajectory_is_conditioned(precision, quantity):
        b_l2, b_max = (trajectory_conditioned_bound(precision, quantity, m, k, pairwise) for m, k in zip(METRICS, kappa))
    else:
        b_l2, b_max = (trajectory_bound(precision, steps, quantity, m, pairwise) for m in METRICS)
    check = compare(x, ref, dtype=precision, quantity=quantity, pairwise=pairwise, bound_l2=b_l2, bound_max=b_max,
                    **labels)
    return check if kappa is None else dataclasses.replace(check, kappa_l2=kappa[0], kappa_max=kappa[1])


def _change(state: TrainState | None, initial: dict, name: str, keep: np.ndarray | None):
    if state is None or name not in state.params:
        return None
    # plain arrays (a perturbed run's are Noisy: the checks compute the change exactly, not the implementation),
    # widened on the fly (no float64 copies of the operands)
    dw = np.subtract(np.asarray(state.params[name]), np.asarray(initial[name]), dtype=np.float64)
    return dw if keep is None else dw[keep]


def compare_trajectories(x: Trajectory, y: Trajectory, ref: ReferenceTrajectory, *, case: str, subject: str,
                         device: str, precision: str, pairwise: bool, names: tuple[str, str]) -> list[Check]:
    """x against y (the reference or another backend): per step the loss and the gradient norm; at each
    checkpoint every tensor's weight change (zero-gradient elements excluded) and its moments."""
    common = dict(case=case, subject=subject, device=device, precision=precision, pairwise=pairwise, names=names)
    kappa = ref.kappa or {}
    checks = []
    n = len(ref.losses)
    for quantity, got, want in (("train_loss", x.losses, y.losses), ("train_grad_norm", x.grad_norms, y.grad_norms)):
        for s in range(1, n + 1):
            a = np.float64(got[s - 1]) if s <= len(got) else None
            b = np.float64(want[s - 1]) if s <= len(want) else None
            checks.append(_check(a, b, steps=s, quantity=quantity, tensor=f"step {s}",
                                 kappa=kappa.get((quantity, f"step {s}")), **common))
    table = [p.name for p in param_table(ref.spec)]
    for k in sorted(ref.states):
        sx, sy = x.states.get(k), y.states.get(k)
        for name in table:
            keep = None if name not in ref.null else ~ref.null[name]
            # the changes from the start, formed block by block by the comparison (errors' `since`)
            a, b = (None if s is None else s.params.get(name) for s in (sx, sy))
            checks.append(_check(a, b, since=(ref.initial[name],) * 2, keep=keep,
                                 steps=k, quantity="train_weights", tensor=f"step {k}: {name}",
                                 kappa=kappa.get(("train_weights", f"step {k}: {name}")), **common))
            for quantity, group in (("train_m", "m"), ("train_v", "v")):
                a = None if sx is None else getattr(sx, group).get(name)
                b = None if sy is None else getattr(sy, group).get(name)
                checks.append(_check(a, b, steps=k, quantity=quantity, tensor=f"step {k}: {name}",
                                     kappa=kappa.get((quantity, f"step {k}: {name}")), **common))
    return checks


def run_trajectory(backends: Sequence[Backend | str], case: TrajectoryCase, precision: str,
                   device: str | None = None, pairwise: bool = True,
                   on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every backend's run of `case` in `precision` against the float64 reference, then every pair.
    Outcomes are the forward suite's (kind="trajectory", dtype = the precision)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown training precision {precision!r}; choose one of {PRECISIONS}")
    resolved = [get(b) if isinstance(b, str) else b for b in backends]
    outcomes: list[Outcome] = []

    def emit(out: Outcome) -> None:
        outcomes.append(out)
        if on_outcome:
            on_outcome(out)

    def outcome(subject, dev, status="ran", **kw) -> Outcome:
        return Outcome(case.id, subject, dev, precision, status, synthetic=True, kind="trajectory", **kw)

    too_big = memory_gap(case.model_case)
    if too_big or precision not in case.precisions:
        message = too_big or f"{case.id} runs in {', '.join(case.precisions)} only"
        for b in resolved:
            emit(outcome(b.name, device or "-", "not run", message=message))
        return outcomes
    spec = case.spec
    runnable = [b for b in resolved if not b.unsupported(spec)]
    ref = workers.take_or_compute(("reference", case, precision), partial(reference_trajectory, case, precision)) \
        if runnable else None
    runs: dict[str, Trajectory] = {}
    devices: dict[str, str] = {}
    for backend in resolved:
        dev = device or backend.devices()[0]
        devices[backend.name] = dev
        missing = backend.unsupported(spec)
        if missing:
            emit(outcome(backend.name, dev, "not implemented", message=missing))
            continue
        if not trains(backend):
            emit(outcome(backend.name, dev, "not implemented", message=f"{backend.name} does not train (SPEC.md 20)"))
            continue
        try:
            run = cached_trajectory(backend, case, ref, precision, dev)
        except Exception as e:  # a crash is a failure of that backend, reported, not fatal
            emit(outcome(backend.name, dev, "error", message=f"{type(e).__name__}: {e}"))
            continue
        runs[backend.name] = run
        checks = compare_trajectories(run, ref, ref, case=case.id, subject=backend.name, device=dev,
                                      precision=precision, pairwise=False, names=(backend.name, "reference"))
        emit(outcome(backend.name, dev, checks=checks, seconds=run.seconds))
    if pairwise:
        for a, b in combinations(runs, 2):
            dev = devices[a] if devices[a] == devices[b] else f"{devices[a]}/{devices[b]}"
            checks = compare_trajectories(runs[a], runs[b], ref, case=case.id, subject=f"{a}~{b}", device=dev,
                                          precision=precision, pairwise=True, names=(a, b))
            emit(outcome(f"{a}~{b}", dev, checks=checks))
    return outcomes


def run_trajectories(backends: Iterable[Backend | str], cases: Iterable[TrajectoryCase],
                     precisions: Iterable[str] | None = None, device: str | None = None, pairwise: bool = True,
                     on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every case in each of its precisions (or those of `precisions` it runs in)."""
    resolved = [get(b) if isinstance(b, str) else b for b in backends]
    wanted = tuple(precisions) if precisions is not None else PRECISIONS
    outcomes = []
    for case in cases:
        for precision in (p for p in wanted if p in case.precisions):
            outcomes += run_trajectory(resolved, case, precision, device, pairwise, on_outcome)
    return outcomes


def worst_by_step(outcome: Outcome, quantity: str, step: int) -> Check | None:
    """The check of `quantity` at step `step` (per-step quantities) or checkpoint `step` furthest from its bound."""
    prefix = f"step {step}"
    checks = [c for c in outcome.checks if c.quantity == quantity
              and (c.tensor == prefix or c.tensor.startswith(prefix + ":"))]
    return max(checks, key=lambda c: c.worst_ratio) if checks else None


def table(outcomes: Iterable[Outcome], title: str = "gptspec trajectory conformance"):
    """A rich Table: per outcome, each quantity's worst error/bound at step 1 and at the last step."""
    from rich.table import Table

    t = Table(title=title, caption="cells: worst error / bound at step 1 | at step N (SPEC.md 20.11)")
    for col in ("case", "backend", "device", "precision", *(q.removeprefix("train_") for q in TRAJECTORY_QUANTITIES),
                "time", "result"):
        t.add_column(col, no_wrap=True)
    for o in outcomes:
        if o.kind != "trajectory":
            continue
        if o.status != "ran":
            t.add_row(o.case, o.subject, o.device, o.dtype, *[""] * len(TRAJECTORY_QUANTITIES), "",
                      f"[{'yellow' if o.ok else 'red'}]{o.status}[/]: {o.message[:60]}")
            continue
        last = max(int(c.tensor.split(":")[0].split()[1]) for c in o.checks)
        cells = []
        for q in TRAJECTORY_QUANTITIES:
            parts = []
            for step in sorted({1, last}):
                c = worst_by_step(o, q, step)
                parts.append("-" if c is None else "[red]" + (c.note or "") + "[/red]" if c.note else
                             f"[{'green' if c.ok else 'red'}]{c.worst_ratio:.2g}[/]")
            cells.append(" | ".join(parts))
        t.add_row(o.case, o.subject, o.device, o.dtype, *cells, f"{o.seconds:.1f}s" if o.seconds else "",
                  "[green]pass[/green]" if o.ok else f"[red]FAIL ({len(o.failures)})[/red]")
    return t


__all__ = ["table", "TrajectoryCase", "trajectory_cases", "small_trajectory_cases", "recipe", "run_trajectory",
           "run_trajectories", "reference_trajectory", "compare_trajectories", "worst_by_step", "trains",
           "TRAJECTORY_QUANTITIES", "KEY_VARIANTS"]
