"""One comparison of one tensor against its reference, under the tolerance policy."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..spec.tolerance import METRICS, bound, conditioned_bound, effective_kappa, errors, is_conditioned


@dataclass(frozen=True)
class Check:
    case: str          # e.g. "test-mini/seed0/B2xT48"
    subject: str       # "torch" (against the reference) or "torch~mlx" (pairwise)
    device: str
    dtype: str
    quantity: str      # logits | loss | grads
    tensor: str        # "logits", "loss" or a parameter name
    rel_l2: float
    rel_max: float
    max_abs: float
    bound_l2: float
    bound_max: float
    note: str = ""     # why it failed, when not (only) a number: NaN, missing tensor, ...
    kappa_l2: float = math.nan   # the tensor's condition estimates (SPEC.md 9), where its bound rests on them
    kappa_max: float = math.nan

    @property
    def ok(self) -> bool:
        return not self.note and self.rel_l2 <= self.bound_l2 and self.rel_max <= self.bound_max

    @property
    def worst_ratio(self) -> float:
        """Error over bound for the tighter metric: <= 1 passes."""
        if self.note:
            return math.inf
        return max(ratio(self.rel_l2, self.bound_l2), ratio(self.rel_max, self.bound_max))

    def as_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok, worst_ratio=self.worst_ratio)


def ratio(error: float, bound: float) -> float:
    # a bound of 0 (a tensor the reference computes without rounding, kappa 0) admits only no error
    return error / bound if bound else (0.0 if error == 0 else math.inf)


def compare(
    x, ref, *, case: str, subject: str, device: str, dtype: str, quantity: str, tensor: str,
    pairwise: bool = False, names: tuple[str, str] = ("backend", "reference"),
    bound_l2: float | None = None, bound_max: float | None = None, kappa: tuple[float, float] | None = None,
    since: tuple | None = None, keep: np.ndarray | None = None,
) -> Check:
    """Check x against ref. NaN or Inf on either side fails, with a note naming the side.
    The bounds are, unless given (bound_l2, bound_max: e.g. the trajectory bounds, which depend on the
    step count too), the tensor's own when its condition estimates `kappa` (reference.condition's) are given
    and the policy is conditioned (SPEC.md 9: c x u x kappa), else the policy's for (dtype, quantity).
    `since` = (x0, ref0) and `keep`: the changes x - x0 and ref - ref0, on the elements of `keep` (errors)."""
    def policy_bound(metric, k):
        if k is not None and is_conditioned():
            return conditioned_bound(dtype, quantity, metric, k, pairwise)
        return bound(dtype, quantity, metric, pairwise)

    kappas = (None, None) if kappa is None else tuple(effective_kappa(dtype, m, kappa) for m in METRICS)
    b_l2, b_max = (given if given is not None else policy_bound(m, k)
                   for given, m, k in zip((bound_l2, bound_max), METRICS, kappas))
    fields = dict(case=case, subject=subject, device=device, dtype=dtype, quantity=quantity,
                  tensor=tensor, bound_l2=b_l2, bound_max=b_max)
    if kappa is not None:
        fields.update(kappa_l2=kappas[0], kappa_max=kappas[1])
    nan = math.nan
    if x is None or ref is None:
        missing = names[0] if x is None else names[1]
        return Check(**fields, rel_l2=nan, rel_max=nan, max_abs=nan, note=f"missing from {missing}")
    x, ref = np.asarray(x), np.asarray(ref)
    if x.shape != ref.shape:
        return Check(**fields, rel_l2=nan, rel_max=nan, max_abs=nan,
                     note=f"shape {x.shape} from {names[0]}, {ref.shape} from {names[1]}")
    rel_l2, rel_max, max_abs = errors(x, ref, since=since, keep=keep)
    if not math.isfinite(rel_l2):  # a NaN or Inf on a side (errors makes rel_l2 say so), or a zero reference
        for side, arr in zip(names, (x, ref)):
            arr = arr if keep is None else arr[keep]  # a dropped element is not compared
            if not np.isfinite(arr).all():
                kind = "NaN" if np.isnan(arr).any() else "Inf"
                return Check(**fields, rel_l2=nan, rel_max=nan, max_abs=nan, note=f"{kind} in {side}")
    return Check(**fields, rel_l2=rel_l2, rel_max=rel_max, max_abs=max_abs)
