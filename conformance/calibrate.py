"""Calibrate the tolerance policy: measure errors over many seeds, write spec/tolerances.json.

    python -m gptspec.conformance.calibrate [--backend NAME ...] [--seeds N] [--gpt2-seeds N]
    python -m gptspec.conformance.calibrate --trajectories [--seeds N] [--horizon 50 --horizon-seeds N]

For every (dtype, quantity, metric) the bound is the smallest number of the form
{1, 2, 5} x 10^k that is at least 3x the largest error measured over every backend,
case and tensor. Steps of that ladder are at most 2.5x apart, so every bound lands
between 3x and 7.5x the largest measured error: never tighter than 2x (flaky), never
looser than 10x (blind). tests/test_tolerances.py holds the file to that rule.

`--trajectories` measures the training bounds (SPEC.md 20.11) the same way, into the file's
"trajectory" key alone: the trajectory cases (conformance/trajectory.py) over seeds, in both training
precisions, on every installed backend; the bound of a step horizon H rests on the largest error of
every check at a step <= H (tests/test_trajectory.py holds the file to the rule).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

from ..backends import available, get
from ..spec import DTYPES
from ..spec import tolerance
from ..spec.tolerance import METRICS, QUANTITIES, TOLERANCES_FILE

SPEC_FILE = TOLERANCES_FILE.with_name("SPEC.md")
BEGIN, END = "<!-- tolerances:begin -->", "<!-- tolerances:end -->"
from ..spec.variants import VARIANTS
from .cases import Case, small_cases
from .runner import run_case

SAFETY = 3.0


def nice_bound(measured: float) -> float:
    """The smallest {1, 2, 5} x 10^k >= SAFETY * measured."""
    target = SAFETY * measured
    k = math.floor(math.log10(target))
    for mantissa in (1, 2, 5, 10):
        b = float(f"{mantissa}e{k}")
        if b >= target * (1 - 1e-12):
            return b
    raise AssertionError("unreachable")


def spec_table(doc: dict) -> str:
    """SPEC.md section 9's table: each bound with the largest error measured and where."""
    lines = ["| dtype | quantity | rel_l2 bound | measured max | rel_max bound | measured max | worst case (rel_l2) |",
             "|---|---|---|---|---|---|---|"]
    for d in DTYPES:
        for q in QUANTITIES:
            b, m = doc["bounds"][d][q], doc["measured"][d][q]
            where = m["rel_l2"]
            lines.append(f"| {d} | {q} | {b['rel_l2']:.0e} | {m['rel_l2']['value']:.1e} | {b['rel_max']:.0e} | "
                         f"{m['rel_max']['value']:.1e} | {where.get('backend', '-')}, {where.get('case', '-')}, "
                         f"`{where.get('tensor', '-')}` |")
    c = doc["calibration"]
    lines.append("")
    lines.append(f"Calibrated {c['date']} on {', '.join(c['backends'])} ({c['machine']}): {c['runs']} runs "
                 f"over {len(c['cases'])} cases x {len(DTYPES)} dtypes.")
    return "\n".join(lines)


def write_spec_table(doc: dict, path=SPEC_FILE) -> None:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{spec_table(doc)}\n{END}{tail}")


def calibration_cases(seeds: int, gpt2_seeds: int, variant_seeds: int, variants=None) -> list[Case]:
    """GPT-2 over many seeds, on small configs and the full gpt2 shapes, and on the trained checkpoint
    (conformance/trained.py); every variant (or those named) on small configs."""
    from .trained import trained_cases

    out = (
        [Case("test-tiny", s, batch=3, length=16) for s in range(seeds)]
        + [Case("test-mini", s, batch=2, length=48) for s in range(seeds)]
        + [Case("gpt2", s, batch=1, length=64) for s in range(gpt2_seeds)]
        + (trained_cases("default") if variants is None or "gpt2" in variants else [])
    )
    for variant in variants or VARIANTS:
        if variant != "gpt2":
            out += [c for s in range(variant_seeds) for c in small_cases((s,), variant)]
    return out


def measure(backends: list[str], cases: list[Case], dtypes=DTYPES, device=None, log=print, on_check=None) -> dict:
    """The largest error of every (dtype, quantity, metric); `on_check(check, backend, case_id)` sees every check."""
    # measuring needs no bounds: run under infinite ones (the file may lack a new quantity yet)
    tolerance.policy.cache_clear()
    unbounded = {"bounds": {d: {q: dict.fromkeys(METRICS, math.inf) for q in QUANTITIES} for d in DTYPES}}
    original = tolerance.policy
    tolerance.policy = lambda: unbounded
    try:
        return _measure(backends, cases, dtypes, device, log, on_check)
    finally:
        tolerance.policy = original


def measured_outcomes(outcomes, case, dtype: str):
    """The outcomes that ran, for a calibration: a crash or a non-numeric check (NaN, a missing tensor) is
    no measurement, and stops the calibration rather than setting a bound."""
    for out in outcomes:
        if out.status == "error":
            raise RuntimeError(f"{out.subject} failed on {case.id} {dtype}: {out.message}")
        if out.status != "ran":
            continue
        for c in out.checks:
            if c.note:
                raise RuntimeError(f"{out.subject} {case.id} {dtype} {c.tensor}: {c.note}")
        yield out


def _measure(backends, cases, dtypes, device, log, on_check=None) -> dict:
    worst: dict = {d: {q: {m: {"value": 0.0} for m in METRICS} for q in QUANTITIES} for d in dtypes}
    resolved = [get(b) for b in backends]
    runs = 0
    for case in cases:
        for dtype in dtypes:
            for out in measured_outcomes(run_case(resolved, case, dtype, device, pairwise=False), case, dtype):
                runs += 1
                for c in out.checks:
                    if on_check:
                        on_check(c, out.subject, case.id)
                    for metric in METRICS:
                        value = getattr(c, metric)
                        slot = worst[dtype][c.quantity][metric]
                        if value > slot["value"]:
                            slot.update(value=value, backend=out.subject, case=case.id, tensor=c.tensor)
            log(f"  {case.id} {dtype}: done")
    return {"worst": worst, "runs": runs}


# -- training trajectories (SPEC.md 20.11) ------------------------------------------------------------
TRAJ_BEGIN, TRAJ_END = "<!-- trajectory-tolerances:begin -->", "<!-- trajectory-tolerances:end -->"


def trajectory_calibration_cases(seeds: int, steps: int = 4, horizon: int | None = None, horizon_seeds: int = 2,
                                 which: str = "all"):
    """The small cases over `seeds` seeds and the full gpt2 shapes' one step (`which`: all, small or gpt2),
    plus, with `horizon`, the small cases over `horizon_seeds` seeds run for `horizon` steps."""
    from .trajectory import TrajectoryCase, small_trajectory_cases, trajectory_cases

    if which == "default":  # the test suite's own cases, once (for a backend too slow for more)
        return trajectory_cases("default") + (small_trajectory_cases(range(horizon_seeds), horizon) if horizon else [])
    out = small_trajectory_cases(range(seeds), steps) if which != "gpt2" else []
    if seeds and which != "small":  # seeds 0: no default-tier runs (only --horizon's, or merging others)
        out.append(TrajectoryCase("gpt2", 0, batch=1, length=32, steps=1, precisions=("float32",), accum=1))
    if horizon:
        out += small_trajectory_cases(range(horizon_seeds), horizon)
    return out


def _step_of(check) -> int:
    # per-step checks are named "step s", state checks "step k: <tensor>"
    return int(check.tensor.split(":")[0].split()[1])


def measure_trajectories(backends: list[str], cases, log=print, on_check=None) -> dict:
    """The largest error of every (precision, step, quantity, metric) over the backends and cases, against
    the reference, measured under infinite bounds."""
    from ..spec.train import PRECISIONS
    from ..spec.tolerance import TRAJECTORY_QUANTITIES
    from .trajectory import run_trajectory

    if not cases:
        return {"by_step": {}, "runs": 0}
    steps = sorted({s for c in cases for s in range(1, c.steps + 1)})
    unbounded = {"horizons": [max(steps)], "bounds": {p: {str(max(steps)): {
        q: dict.fromkeys(METRICS, math.inf) for q in TRAJECTORY_QUANTITIES}} for p in PRECISIONS}}
    tolerance.policy.cache_clear()
    original = tolerance.policy
    forward = original()
    tolerance.policy = lambda: dict(forward, trajectory=unbounded)
    # worst[precision][step][quantity][metric]
    worst: dict = {}
    runs = 0
    try:
        resolved = [get(b) for b in backends]
        for case in cases:
            for precision in case.precisions:
                for out in measured_outcomes(run_trajectory(resolved, case, precision, pairwise=False), case, precision):
                    runs += 1
                    for c in out.checks:
                        if on_check:
                            on_check(c, out.subject, case.id)
                        for metric in METRICS:
                            slot = (worst.setdefault(precision, {}).setdefault(_step_of(c), {})
                                    .setdefault(c.quantity, {}).setdefault(metric, {"value": 0.0}))
                            value = getattr(c, metric)
                            if value > slot["value"]:
                                slot.update(value=value, backend=out.subject, case=case.id, tensor=c.tensor)
                log(f"  {case.id} {precision}: done")
    finally:
        tolerance.policy = original
    return {"by_step": worst, "runs": runs}


def trajectory_bounds(by_step: dict, horizons) -> tuple[dict, dict]:
    """(bounds, measured) per precision and horizon: each from the largest error at any step <= horizon."""
    from ..spec.tolerance import TRAJECTORY_QUANTITIES

    bounds, measured = {}, {}
    for precision, steps in by_step.items():
        for h in horizons:
            slots = {}
            for s, quantities in steps.items():
                if s > h:
                    continue
                for q, metrics in quantities.items():
                    for k, slot in metrics.items():
                        best = slots.setdefault(q, {}).get(k)
                        if best is None or slot["value"] > best["value"]:
                            slots[q][k] = dict(slot, step=s)
            missing = [q for q in TRAJECTORY_QUANTITIES if q not in slots]
            if not slots:
                continue  # this precision never ran that far
            if missing or any(m["value"] <= 0 for q in slots.values() for m in q.values()):
                raise RuntimeError(f"{precision} horizon {h}: no error measured for {missing or 'some metric'}")
            measured.setdefault(precision, {})[str(h)] = slots
            bounds.setdefault(precision, {})[str(h)] = {
                q: {k: nice_bound(slots[q][k]["value"]) for k in METRICS} for q in TRAJECTORY_QUANTITIES}
    return bounds, measured


def trajectory_table(section: dict) -> str:
    """SPEC.md 20.11's table: each trajectory bound with the largest error measured and where."""
    from ..spec.tolerance import TRAJECTORY_QUANTITIES

    lines = ["| precision | steps <= | quantity | rel_l2 bound | measured max | rel_max bound | measured max | "
             "worst case (rel_l2) |", "|---|---|---|---|---|---|---|---|"]
    for p, horizons in section["bounds"].items():
        for h, quantities in sorted(horizons.items(), key=lambda kv: int(kv[0])):
            for q in TRAJECTORY_QUANTITIES:
                b, m = quantities[q], section["measured"][p][h][q]
                where = m["rel_l2"]
                lines.append(f"| {p} | {h} | {q} | {b['rel_l2']:.0e} | {m['rel_l2']['value']:.1e} | "
                             f"{b['rel_max']:.0e} | {m['rel_max']['value']:.1e} | {where['backend']}, "
                             f"{where['case']}, `{where['tensor']}` |")
    c = section["calibration"]
    lines += ["", f"Calibrated {c['date']} on {', '.join(c['backends'])} ({c['machine']}): {c['runs']} runs "
                  f"over {len(c['cases'])} cases."]
    return "\n".join(lines)


def write_trajectory_table(section: dict, path=SPEC_FILE) -> None:
    text = path.read_text()
    if TRAJ_BEGIN not in text:
        raise RuntimeError(f"{path} lacks the {TRAJ_BEGIN} ... {TRAJ_END} markers of section 20.11")
    head, rest = text.split(TRAJ_BEGIN, 1)
    _, tail = rest.split(TRAJ_END, 1)
    path.write_text(f"{head}{TRAJ_BEGIN}\n{trajectory_table(section)}\n{TRAJ_END}{tail}")


def trajectory_before_bound(doc: dict):
    """(check, metric) -> the per-horizon trajectory bound of the file `doc` (the unconditioned policy)."""
    horizons = sorted(int(h) for h in doc["trajectory"]["horizons"])

    def before(check, metric):
        h = next(h for h in horizons if _step_of(check) <= h)
        return doc["trajectory"]["bounds"][check.dtype][str(h)][check.quantity][metric]
    return before


def calibrate_trajectories_conditioned(args, backends) -> int:
    """The conditioned constants of the training checks (SPEC.md 9, 20.11): per precision and quantity, from
    the largest error / (u kappa) over the trajectory cases; into the file's trajectory["conditioned"]."""
    from ..spec.train import PRECISIONS
    from ..spec.tolerance import TRAJECTORY_QUANTITIES
    from .calibrate_conditioned import Ratios

    doc = json.loads(Path(args.out).read_text())
    ratios = Ratios(PRECISIONS, TRAJECTORY_QUANTITIES, trajectory_before_bound(doc))
    if args.ratios_from:
        cases, runs, backends = [], 0, []
        for f in args.ratios_from:
            part = json.loads(Path(f).read_text())
            ratios.load(part["ratios"])
            backends = sorted(set(backends) | set(part["backends"]))
            cases += part["cases"]
            runs += part["runs"]
    else:
        chosen = trajectory_calibration_cases(args.seeds, 4, args.horizon, args.horizon_seeds, args.cases)
        cases = [c.id for c in chosen]
        print(f"calibrating the conditioned trajectory bounds on {', '.join(backends)}: {len(chosen)} cases",
              file=sys.stderr)
        runs = measure_trajectories(backends, chosen, log=lambda s: print(s, file=sys.stderr),
                                    on_check=ratios.add)["runs"]
        if args.ratios_out:
            Path(args.ratios_out).write_text(json.dumps({"ratios": ratios.dump(), "backends": backends,
                                                         "cases": cases, "runs": runs}))
            return 0
    constants, measured = ratios.section()
    spread, before = ratios.spread(constants), ratios.spread_before()
    # adopted where the estimate predicts the errors at least as well as the per-horizon bounds do (measured:
    # median bound / error no larger); elsewhere the per-horizon bounds stay (SPEC.md 20.11 says why)
    adopted = [[p, q] for p in PRECISIONS for q in TRAJECTORY_QUANTITIES
               if q in spread.get(p, {}) and spread[p][q]["median"] <= before[p][q]["median"]]
    doc["trajectory"]["conditioned"] = {
        "policy": "bound = c x u(precision) x kappa per check, kappa its condition estimate through the steps "
                  "(Monte Carlo arithmetic on the reference's training run); c as for the model checks; used for "
                  "the adopted (precision, quantity) pairs only, whose median bound / error is no larger than the "
                  "per-horizon bounds'. See spec/SPEC.md 9 and 20.11.",
        "adopted": adopted,
        "constants": constants,
        "measured": measured,
        "spread": spread,
        "spread_before": before,
        "calibration": {"date": datetime.date.today().isoformat(), "backends": sorted(backends), "runs": runs,
                        "cases": sorted(set(cases)),
                        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"},
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    tolerance.policy.cache_clear()
    if args.out == str(TOLERANCES_FILE):
        _write_between(TRAJ_COND_BEGIN, TRAJ_COND_END, conditioned_table(doc["trajectory"]["conditioned"],
                                                                       PRECISIONS, TRAJECTORY_QUANTITIES))
    print(conditioned_table(doc["trajectory"]["conditioned"], PRECISIONS, TRAJECTORY_QUANTITIES))
    return 0


def calibrate_trajectories(args, backends) -> int:
    if args.conditioned:
        return calibrate_trajectories_conditioned(args, backends)
    cases = trajectory_calibration_cases(args.seeds, 4, args.horizon, args.horizon_seeds, args.cases)
    print(f"calibrating trajectories on {', '.join(backends)}: {len(cases)} cases", file=sys.stderr)
    m = measure_trajectories(backends, cases, log=lambda s: print(s, file=sys.stderr))
    doc = json.loads(Path(args.out).read_text())
    # earlier measurements: the --out file's (--merge) and other calibrations' files (--merge-from: another
    # process or machine); each (precision, step, quantity, metric) keeps the largest of all
    earlier = ([doc["trajectory"]] if args.merge and "trajectory" in doc else []) + [
        json.loads(Path(f).read_text())["trajectory"] for f in args.merge_from or ()]
    by_step = m["by_step"]
    for section in earlier:
        for p, steps in section["by_step"].items():
            for s, quantities in steps.items():
                for q, metrics in quantities.items():
                    for k, old in metrics.items():
                        slot = by_step.setdefault(p, {}).setdefault(int(s), {}).setdefault(q, {}).get(k)
                        if slot is None or old["value"] > slot["value"]:
                            by_step[p][int(s)][q][k] = old
    horizons = sorted({1, 4} | ({args.horizon} if args.horizon else set())
                      | {h for section in earlier for h in section["horizons"]})
    bounds, measured = trajectory_bounds(by_step, horizons)
    section = {
        "policy": "per precision and step horizon H: bound = smallest {1,2,5}x10^k >= 3 x the largest error "
                  "measured at any step <= H; a check at step s uses the smallest H >= s; pairwise 2 x bound. "
                  "See spec/SPEC.md 20.11.",
        "horizons": horizons,
        "bounds": bounds,
        "measured": measured,
        "by_step": {p: {str(s): q for s, q in sorted(steps.items())} for p, steps in by_step.items()},
        "calibration": {
            "date": datetime.date.today().isoformat(),
            "backends": sorted(set(backends if m["runs"] else ()).union(
                *(e["calibration"]["backends"] for e in earlier))),
            "runs": m["runs"] + sum(e["calibration"]["runs"] for e in earlier),
            "cases": sorted(set(c.id for c in cases).union(*(e["calibration"]["cases"] for e in earlier))),
            "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        },
    }
    doc["trajectory"] = section
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    tolerance.policy.cache_clear()
    if args.out == str(TOLERANCES_FILE):
        write_trajectory_table(section)
    print(trajectory_table(section))
    return 0


COND_BEGIN, COND_END = "<!-- conditioned:begin -->", "<!-- conditioned:end -->"


TRAJ_COND_BEGIN, TRAJ_COND_END = "<!-- trajectory-conditioned:begin -->", "<!-- trajectory-conditioned:end -->"


def _write_between(begin: str, end: str, body: str, path=SPEC_FILE) -> None:
    text = path.read_text()
    if begin not in text:
        raise RuntimeError(f"{path} lacks the {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def conditioned_table(section: dict, dtypes=DTYPES, quantities=QUANTITIES) -> str:
    """SPEC.md's table of conditioned constants, the ratio behind each and where, then the spread."""
    from .calibrate_conditioned import spread_table

    lines = ["| dtype | quantity | c (rel_l2) | largest error / (u kappa) | c (rel_max) | largest | worst case (rel_l2) |",
             "|---|---|---|---|---|---|---|"]
    for d in dtypes:
        for q in quantities:
            c, m = section["constants"][d][q], section["measured"][d][q]
            where = m["rel_l2"]
            lines.append(f"| {d} | {q} | {c['rel_l2']:g} | {m['rel_l2']['value']:.2f} | {c['rel_max']:g} | "
                         f"{m['rel_max']['value']:.2f} | {where['backend']}, {where['case']}, `{where['tensor']}` |")
    cal = section["calibration"]
    if "adopted" in section:
        lines += ["", "Adopted (the rest keep the per-horizon bounds): " + (", ".join(
            f"{p} {q}" for p, q in section["adopted"]) or "none") + "."]
    lines += ["", f"Calibrated {cal['date']} on {', '.join(cal['backends'])} ({cal['machine']}): {cal['runs']} runs "
                  f"over {len(cal['cases'])} cases.", "",
              "How far below its bound each check of that calibration landed (bound / error, both metrics), "
              "with the conditioned bounds:", "", spread_table(section["spread"]), "",
              "and with the per-quantity bounds above, one for every tensor of a quantity:", "",
              spread_table(section["spread_before"])]
    return "\n".join(lines)


def calibrate_conditioned(args, backends) -> int:
    from .calibrate_conditioned import Ratios

    doc = json.loads(Path(args.out).read_text())
    ratios = Ratios(DTYPES, QUANTITIES, lambda c, metric: doc["bounds"][c.dtype][c.quantity][metric])
    if args.ratios_from:  # join calibrations run in other processes: nothing is measured here
        cases, m, backends = [], {"runs": 0}, []
        for f in args.ratios_from:
            part = json.loads(Path(f).read_text())
            ratios.load(part["ratios"])
            backends += part["backends"]
            cases += [argparse.Namespace(id=c) for c in part["cases"]]
            m["runs"] += part["runs"]
    else:
        if args.cases == "default":  # the default tier's cases of every variant (for a backend too slow for more)
            from .cases import cases as tier_cases

            cases = tier_cases("default", variants=args.variant or VARIANTS)
        else:
            cases = calibration_cases(args.seeds, args.gpt2_seeds, args.variant_seeds, args.variant)
        print(f"calibrating the conditioned bounds on {', '.join(backends)}: {len(cases)} cases x {len(DTYPES)} "
              "dtypes", file=sys.stderr)
        done: list[str] = []

        def log(line: str) -> None:
            print(line, file=sys.stderr)
            if args.ratios_out:  # after every case and dtype: a part stopped early keeps what it measured
                done.append(line.strip().split(" ")[0])
                Path(args.ratios_out).write_text(json.dumps({"ratios": ratios.dump(), "backends": backends,
                                                             "cases": sorted(set(done)), "runs": len(done)}))

        m = measure(backends, cases, device=args.device, log=log, on_check=ratios.add)
        if args.ratios_out:
            return 0
    earlier = doc.get("conditioned") if args.merge else None
    if earlier:
        ratios.merge(earlier["measured"])
    constants, measured = ratios.section()
    calibration = {
        "date": datetime.date.today().isoformat(),
        "backends": sorted(set(backends) | set(earlier["calibration"]["backends"] if earlier else ())),
        "runs": m["runs"] + (earlier["calibration"]["runs"] if earlier else 0),
        "cases": sorted({c.id for c in cases} | set(earlier["calibration"]["cases"] if earlier else ())),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }
    doc["conditioned"] = {
        "policy": "bound = c x u(dtype) x kappa per tensor, kappa its condition estimate (Monte Carlo arithmetic, "
                  "spec/reference/conditioning.py); c = smallest {1,1.2,1.5,2,2.5,3,4,5,6,8}x10^k >= 3 x the largest "
                  "error / (u kappa) measured; pairwise 2 x bound. See spec/SPEC.md 9.",
        "constants": constants,
        "measured": measured,
        "spread": ratios.spread(constants),
        "spread_before": ratios.spread_before(),
        "calibration": calibration,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    tolerance.policy.cache_clear()
    if args.out == str(TOLERANCES_FILE):
        _write_between(COND_BEGIN, COND_END, conditioned_table(doc["conditioned"]))
    print(conditioned_table(doc["conditioned"]))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptspec.conformance.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", help="backends to measure (default: all installed)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seeds", type=int, default=12, help="seeds per small config")
    ap.add_argument("--gpt2-seeds", type=int, default=3, help="seeds of the full gpt2 shapes")
    ap.add_argument("--variant-seeds", type=int, default=4, help="seeds per small config of each variant")
    ap.add_argument("--variant", action="append", metavar="NAME",
                    help="measure only these variants (repeatable; default: every variant)")
    ap.add_argument("--merge", action="store_true",
                    help="add to the measurements already in --out: each bound then comes from the largest error "
                         "of both calibrations (for variants added since the last full one)")
    ap.add_argument("--out", default=str(TOLERANCES_FILE))
    ap.add_argument("--trajectories", action="store_true",
                    help="calibrate the training bounds (SPEC.md 20.11) instead: trajectory cases over --seeds seeds")
    ap.add_argument("--conditioned", action="store_true",
                    help="calibrate the constants of the per-tensor conditioned bounds (SPEC.md 9) instead, over the "
                         "same cases as the bounds (--seeds, --gpt2-seeds, --variant-seeds, --variant, --merge); with "
                         "--trajectories, those of the training checks")
    ap.add_argument("--ratios-out", metavar="FILE",
                    help="with --conditioned: write what was measured to FILE instead of the policy (one part of a "
                         "calibration split over processes)")
    ap.add_argument("--ratios-from", action="append", metavar="FILE",
                    help="with --conditioned: join the parts written by --ratios-out into the policy; measures nothing")
    ap.add_argument("--horizon", type=int, default=None,
                    help="with --trajectories: also run the small cases this many steps (the heavy tier's 50)")
    ap.add_argument("--horizon-seeds", type=int, default=2, help="seeds of the --horizon runs")
    ap.add_argument("--cases", choices=("all", "small", "gpt2", "default"), default="all",
                    help="with --trajectories: the small configs over --seeds, the full gpt2 shapes, both, or the "
                         "default tier's cases once; with --conditioned, 'default' measures the default tier's cases "
                         "of every variant instead of --seeds and the others")
    ap.add_argument("--merge-from", action="append", metavar="FILE",
                    help="with --trajectories: also keep the trajectory measurements of another calibration's "
                         "tolerances file (another process or machine); repeatable")
    args = ap.parse_args(argv)
    backends = args.backend or available()
    if args.trajectories:
        return calibrate_trajectories(args, backends)
    if args.conditioned:
        return calibrate_conditioned(args, backends)
    cases = calibration_cases(args.seeds, args.gpt2_seeds, args.variant_seeds, args.variant)
    print(f"calibrating on {', '.join(backends)}: {len(cases)} cases x {len(DTYPES)} dtypes", file=sys.stderr)
    m = measure(backends, cases, device=args.device, log=lambda s: print(s, file=sys.stderr))
    earlier = None
    if args.merge:
        earlier = json.loads(Path(args.out).read_text())
        for d in DTYPES:
            for q in QUANTITIES:
                for k in METRICS:
                    old = earlier["measured"].get(d, {}).get(q, {}).get(k)
                    if old and old["value"] > m["worst"][d][q][k]["value"]:
                        m["worst"][d][q][k] = old
    empty = [f"{d} {q} {k}" for d in DTYPES for q in QUANTITIES for k in METRICS
             if m["worst"][d][q][k]["value"] <= 0]
    if empty:  # a bound must come from a measurement: zero means nothing (or nothing inexact) ran
        print(f"no error measured for: {', '.join(empty)}; add cases or backends that exercise them",
              file=sys.stderr)
        return 1
    bounds = {d: {q: {k: nice_bound(m["worst"][d][q][k]["value"]) for k in METRICS}
                  for q in QUANTITIES} for d in DTYPES}
    doc = {
        "policy": "bound = smallest {1,2,5}x10^k >= 3 x the largest error measured (so 3x..7.5x); "
                  "pairwise comparisons use 2 x bound. Metrics: rel_l2 = ||x-ref||/||ref||, "
                  "rel_max = max|x-ref| / max|ref|. See spec/SPEC.md, 'Tolerance policy'.",
        "bounds": bounds,
        "measured": m["worst"],
        "calibration": {
            "date": datetime.date.today().isoformat(),
            "backends": backends,
            "device": args.device or "default",
            "runs": m["runs"],
            "cases": [c.id for c in cases],
            "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        },
    }
    if earlier is not None:  # merged: both calibrations are on record, and the bounds rest on all their backends
        previous = earlier["calibration"]
        doc["calibration"]["backends"] = sorted(set(backends) | set(previous["backends"]))
        doc["calibration"]["measured_here"] = backends
        doc["calibration"]["merged_with"] = previous.get("merged_with", []) + [
            {k: v for k, v in previous.items() if k != "merged_with"}]
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    if args.out == str(TOLERANCES_FILE):
        write_spec_table(doc)  # the spec shows the numbers it is held to
    for d in DTYPES:
        for q in QUANTITIES:
            row = ", ".join(f"{k} {m['worst'][d][q][k]['value']:.2e} -> {bounds[d][q][k]:.0e}" for k in METRICS)
            print(f"{d:9s} {q:7s} {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
