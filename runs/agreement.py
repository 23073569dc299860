"""Whether two runs of one recipe in two backends came out the same (`gptspec recipe check RUN_A RUN_B`).

Two runs with the same trajectory settings (runs/config.py: model, variant, sizes, batch, TrainSpec and
its seed) and the same data start from the same bits and read the same batches, so they differ only by
each framework's arithmetic. Their loss curves are compared step by step:

- up to the last step the trajectory bounds are calibrated for (SPEC.md 20.11, spec/tolerances.json
  "trajectory": 50 steps), each step's train loss and pre-clip gradient norm within the pairwise bound
  of its step's horizon (twice the bound against the reference);
- at the end, the last common step's train loss and the last common evaluation's validation loss within
  FINAL_TOLERANCES[precision], relative. Past the calibrated horizon no per-step bound is claimed: rounding
  differences are amplified by training, and the curves are only promised to end at the same loss.

FINAL_TOLERANCES are measured (docs/experiments.md, "Cross-framework run check"): torch against MLX on
this project's CPU, the seed001 and seed000 CPU recipes over 600 steps in float32 (the largest train-loss
difference at any step after 50: 3.5e-7; torch against tinygrad, 200 steps: 1.9e-7) and seed001's over
200 steps in mixed_bfloat16 (4.7e-4); each
bound is section 9's ladder above 3x the worst. They hold for these runs; a longer run, another device
(TF32 matmuls on a GPU) or a less stable recipe may drift further, which `--final-tolerance` states.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..spec import InputError
from ..spec.tolerance import policy, trajectory_bound
from . import checkpoint, metrics
from .config import RunConfig

FINAL_TOLERANCES = {"float32": 2e-6, "mixed_bfloat16": 2e-3}


@dataclass
class CurveCheck:
    what: str           # "step 12 train_loss", "final val_loss", ...
    a: float
    b: float
    bound: float

    @property
    def error(self) -> float:
        return abs(self.a - self.b) / abs(self.b) if self.b else abs(self.a - self.b)

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


@dataclass
class Agreement:
    run_a: Path
    run_b: Path
    backends: tuple[str, str]
    precision: str
    steps: int                       # steps both runs hold
    per_step_until: int              # the last step checked against the trajectory bounds
    checks: list[CurveCheck] = field(default_factory=list)
    largest_late_error: float = 0.0  # the largest train-loss difference after per_step_until, for information
    largest_late_step: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[CurveCheck]:
        return [c for c in self.checks if not c.ok]


def _progress(run_dir: Path) -> dict:
    path = run_dir / checkpoint.NAME / checkpoint.FILES[2]
    if not path.exists():
        raise InputError(f"{run_dir}: no complete checkpoint ({path} is missing), so its settings are unknown")
    return json.loads(path.read_text())


def _max_horizon() -> int:
    return max(int(h) for h in policy()["trajectory"]["horizons"])


def compare_curves(run_a, run_b, final_tolerance: float | None = None) -> Agreement:
    """The step-by-step and final agreement of two runs of the same recipe (see the module's text)."""
    run_a, run_b = Path(run_a), Path(run_b)
    pa, pb = _progress(run_a), _progress(run_b)
    ca, cb = RunConfig.from_dict(pa["config"]), RunConfig.from_dict(pb["config"])
    differences = ca.differences(cb)
    if differences:
        raise InputError(f"{run_a} and {run_b} are not the same recipe, so their curves need not agree: "
                         + "; ".join(differences))
    if pa["data"]["fingerprint"] != pb["data"]["fingerprint"]:
        raise InputError(f"{run_a} trained on data {pa['data']['fingerprint']}, {run_b} on "
                         f"{pb['data']['fingerprint']}: not the same batches")
    ra, rb = metrics.read(run_a), metrics.read(run_b)
    sa = {int(r["step"]): r for r in metrics.steps(ra)}
    sb = {int(r["step"]): r for r in metrics.steps(rb)}
    common = sorted(set(sa) & set(sb))
    if not common or common[0] != 1:
        raise InputError(f"{run_a} and {run_b} hold no common steps from step 1 (steps {min(sa, default=None)}.."
                         f"{max(sa, default=None)} and {min(sb, default=None)}..{max(sb, default=None)})")
    precision = ca.train_spec.precision
    if final_tolerance is None:
        final_tolerance = FINAL_TOLERANCES[precision]
    last = common[-1]
    until = min(last, _max_horizon())
    out = Agreement(run_a, run_b, (ca.backend, cb.backend), precision, last, until)
    for s in common:
        if s <= until:
            for quantity, key in (("train_loss", "loss"), ("train_grad_norm", "grad_norm")):
                bound = trajectory_bound(precision, s, quantity, "rel_max", pairwise=True)
                out.checks.append(CurveCheck(f"step {s} {quantity}", _finite(sa[s], key, run_a),
                                             _finite(sb[s], key, run_b), bound))
        else:
            c = CurveCheck("", _finite(sa[s], "loss", run_a), _finite(sb[s], "loss", run_b), 0.0)
            if c.error >= out.largest_late_error:
                out.largest_late_error, out.largest_late_step = c.error, s
    out.checks.append(CurveCheck(f"final step {last} train_loss", sa[last]["loss"], sb[last]["loss"],
                                 final_tolerance))
    ea = {int(r["step"]): r["val_loss"] for r in metrics.evals(ra)}
    eb = {int(r["step"]): r["val_loss"] for r in metrics.evals(rb)}
    evals = sorted(set(ea) & set(eb))
    if evals:
        s = evals[-1]
        out.checks.append(CurveCheck(f"final eval (step {s}) val_loss", ea[s], eb[s], final_tolerance))
    return out


def _finite(record: dict, key: str, run_dir: Path) -> float:
    v = record.get(key)
    if v is None:  # metrics.jsonl writes a non-finite value as null
        raise InputError(f"{run_dir}: step {record.get('step')} has no finite {key} (the run diverged)")
    return float(v)
