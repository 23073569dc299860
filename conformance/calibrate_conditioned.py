"""Calibrate the conditioned bounds (SPEC.md 9): per (dtype, quantity, metric) the constant c of
bound = c x u(dtype) x kappa, from the largest error measured in units of u x kappa.

    python -m gptspec.conformance.calibrate --conditioned [--seeds N] [--gpt2-seeds N] [--variant-seeds N] [--merge]

c is the smallest number of a fine ladder (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k, steps at most 1.33x
apart) at least 3x the largest error / (u x kappa) over every backend, case and tensor, so the tensor that
set it lands at 3x..4x below its bound, and every other tensor by its own condition. What matters then is the
spread: how far below its bound a typical tensor lands. `spread` reports it per (dtype, quantity): the median
and the largest bound / error over every check measured, and the share of checks within 10x of their bound.
"""
from __future__ import annotations

import math

import numpy as np

from ..spec.tolerance import METRICS, PRECISION_ROUNDOFF, UNIT_ROUNDOFF

ROUNDOFF = {**UNIT_ROUNDOFF, **PRECISION_ROUNDOFF}  # a check's dtype is a dtype, or a training precision

SAFETY = 3.0
LADDER = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def nice_constant(ratio: float) -> float:
    """The smallest ladder number x 10^k >= SAFETY * ratio."""
    target = SAFETY * ratio
    k = math.floor(math.log10(target))
    for mantissa in LADDER:
        c = round(mantissa * 10.0 ** k, 12)
        if c >= target * (1 - 1e-12):
            return c
    raise AssertionError("unreachable")


def ratio_of(check, metric: str) -> float | None:
    """A check's error in units of u x kappa (None without a condition estimate; 0 for an exact tensor)."""
    kappa = check.kappa_l2 if metric == "rel_l2" else check.kappa_max
    if math.isnan(kappa):
        return None
    error = getattr(check, metric)
    if kappa == 0:
        if error:
            raise RuntimeError(f"{check.subject} {check.case} {check.tensor}: error {error:.2e} where the "
                               "reference rounds nothing (kappa 0)")
        return 0.0
    return error / (ROUNDOFF[check.dtype] * kappa)


class Ratios:
    """Every measured ratio, by (dtype, quantity, metric), with where the largest came from."""

    def __init__(self, dtypes, quantities, before_bound=None):
        self.dtypes, self.quantities = tuple(dtypes), tuple(quantities)
        self.values: dict = {}
        self.worst: dict = {}
        self.before_bound = before_bound  # (check, metric) -> the unconditioned policy's bound, for the spread
        self.before: dict = {}

    def add(self, check, backend: str, case: str) -> None:
        for metric in METRICS:
            r = ratio_of(check, metric)
            if r is None:
                continue
            key = (check.dtype, check.quantity, metric)
            self.values.setdefault(key, []).append(r)
            error = getattr(check, metric)
            if self.before_bound and error > 0:
                self.before.setdefault(key[:2], []).append(self.before_bound(check, metric) / error)
            if r > self.worst.get(key, {"value": -1.0})["value"]:
                self.worst[key] = {"value": r, "backend": backend, "case": case, "tensor": check.tensor}

    def dump(self) -> dict:
        """Everything measured, as JSON (a calibration split over processes is joined with `load`)."""
        return {"values": {"|".join(k): v for k, v in self.values.items()},
                "before": {"|".join(k): v for k, v in self.before.items()},
                "worst": [[*k, v] for k, v in self.worst.items()]}

    def load(self, dumped: dict) -> None:
        for k, v in dumped["values"].items():
            self.values.setdefault(tuple(k.split("|")), []).extend(v)
        for k, v in dumped["before"].items():
            self.before.setdefault(tuple(k.split("|")), []).extend(v)
        for d, q, m, slot in dumped["worst"]:
            if slot["value"] > self.worst.get((d, q, m), {"value": -1.0})["value"]:
                self.worst[(d, q, m)] = slot

    def merge(self, earlier: dict) -> None:
        """Keep the larger of each worst ratio already on file (a --merge calibration)."""
        for d, quantities in earlier.items():
            for q, metrics in quantities.items():
                for m, old in metrics.items():
                    if old["value"] > self.worst.get((d, q, m), {"value": -1.0})["value"]:
                        self.worst[(d, q, m)] = old

    def section(self) -> tuple[dict, dict]:
        constants, measured = {}, {}
        for (d, q, m), slot in sorted(self.worst.items()):
            measured.setdefault(d, {}).setdefault(q, {})[m] = slot
            constants.setdefault(d, {}).setdefault(q, {})[m] = nice_constant(slot["value"]) if slot["value"] else None
        missing = [f"{d} {q} {m}" for d in self.dtypes for q in self.quantities for m in METRICS
                   if not (constants.get(d, {}).get(q, {}).get(m))]
        if missing:
            raise RuntimeError(f"no error measured for: {', '.join(missing)}; add cases or backends that exercise them")
        return constants, measured

    def spread(self, constants: dict) -> dict:
        """Per dtype and quantity, over every check measured (both metrics): the median and the largest
        bound / error, and the share within 10x of its bound."""
        out = {}
        for d in self.dtypes:
            for q in self.quantities:
                slack = []
                for m in METRICS:
                    c = constants.get(d, {}).get(q, {}).get(m)
                    slack += [c / r for r in self.values.get((d, q, m), ()) if r > 0 and c]
                if slack:
                    s = np.asarray(slack)
                    out.setdefault(d, {})[q] = {"checks": len(s), "median": float(np.median(s)),
                                                "p90": float(np.quantile(s, 0.9)), "max": float(s.max()),
                                                "within_10x": float((s <= 10).mean())}
        return out


    def spread_before(self) -> dict:
        """The same statistics under the per-quantity bounds (one bound for every tensor of a quantity)."""
        out = {}
        for d, q in ((d, q) for d in self.dtypes for q in self.quantities if (d, q) in self.before):
            s = np.asarray(self.before[d, q])
            out.setdefault(d, {})[q] = {"checks": len(s), "median": float(np.median(s)),
                                        "p90": float(np.quantile(s, 0.9)), "max": float(s.max()),
                                        "within_10x": float((s <= 10).mean())}
        return out


def spread_table(spread: dict) -> str:
    lines = ["| dtype | quantity | checks | median bound/error | 90th percentile | largest | within 10x |",
             "|---|---|---|---|---|---|---|"]
    for d, quantities in spread.items():
        for q, s in quantities.items():
            lines.append(f"| {d} | {q} | {s['checks']} | {s['median']:.1f} | {s['p90']:.1f} | {s['max']:.0f} | "
                         f"{100 * s['within_10x']:.0f}% |")
    return "\n".join(lines)
