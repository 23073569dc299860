"""Trajectory conformance (SPEC.md 20.11): every installed backend trains N steps as the float64 reference
does, and as every other backend does, under the calibrated trajectory bounds.

    pytest tests/test_trajectory.py --backend torch --dtype float32 --tier heavy --variant ngpt

--dtype float32 selects float32 training, --dtype bfloat16 mixed_bfloat16 (SPEC.md 20.9).
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from gptspec import backends
from gptspec.conformance.calibrate import nice_bound
from gptspec.conformance.report import failure_text
from gptspec.conformance.runner import GAPS
from gptspec.conformance.trajectory import (
    TrajectoryCase, null_elements, recipe, reference_trajectory, run_trajectory, trajectory_cases,
)
from gptspec.spec import ModelSpec
from gptspec.spec.reference.training import TrainState
from gptspec.spec.tolerance import METRICS, TRAJECTORY_QUANTITIES, horizon, policy, trajectory_bound
from gptspec.spec.train import PRECISIONS

_PRECISION_OF_DTYPE = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def _selection(config):
    chosen = config.getoption("--backend") or backends.available()
    dtypes = config.getoption("--dtype")
    precisions = PRECISIONS if dtypes is None else [_PRECISION_OF_DTYPE[d] for d in dtypes if d in _PRECISION_OF_DTYPE]
    suite = trajectory_cases(config.getoption("--tier"), config.getoption("--variant"))
    runs = [(c, p) for c in suite for p in c.precisions if p in precisions]
    return chosen, runs


def pytest_generate_tests(metafunc):
    # one test function for each backend and each pair, grouped by (case, precision), so the pairwise checks
    # reuse the runs (and the float64 reference) of the tests just before them
    if "subject" not in metafunc.fixturenames:
        return
    chosen, runs = _selection(metafunc.config)
    subjects = [(b,) for b in chosen] + list(combinations(chosen, 2))
    params = [(c, p, s) for c, p in runs for s in subjects]
    metafunc.parametrize("case,precision,subject", params, ids=[f"{'~'.join(s)}-{p}-{c.id}" for c, p, s in params])


def test_trajectory(case, precision, subject, request):
    """A backend against the float64 reference, or (two names) a pair of backends against each other."""
    chosen = [backends.get(n) for n in subject]  # an unusable requested backend fails here, loudly
    outcomes = run_trajectory(chosen, case, precision, request.config.getoption("--device"), pairwise=len(chosen) > 1)
    judged = [o for o in outcomes if "~" in o.subject] if len(chosen) > 1 else outcomes
    if not judged or all(o.status in GAPS for o in judged):
        pytest.skip("; ".join(o.message for o in outcomes if o.message) or "no pair ran")
    assert all(o.ok for o in outcomes), failure_text(outcomes)


# -- what the checks hold ------------------------------------------------------------------------
def test_checks_cover_every_step_and_every_tensor_at_each_checkpoint():
    case = TrajectoryCase("test-tiny", 0, batch=2, length=16, steps=3)
    ref = reference_trajectory(case, "float32")
    from gptspec.conformance.trajectory import compare_trajectories

    checks = compare_trajectories(ref, ref, ref, case=case.id, subject="reference", device="cpu",
                                  precision="float32", pairwise=False, names=("a", "b"))
    n_params = len(ref.initial)
    per_step = 2 * case.steps
    assert len(checks) == per_step + 3 * n_params * len(case.checkpoints)
    assert case.checkpoints == (1, 3)
    assert all(c.ok and c.rel_l2 == 0 for c in checks)  # the reference against itself: exactly zero


def test_a_wrong_learning_rate_fails_the_weight_change_but_not_the_first_loss():
    # a backend run of the same case at lr 0.9x: the first loss is computed before any update and agrees,
    # the weight change after step 1 is 10% off, far beyond any float32 bound
    from gptspec.conformance.trajectory import Trajectory, compare_trajectories
    from gptspec.spec import reference

    case = TrajectoryCase("test-tiny", 1, batch=2, length=16, steps=1)
    ref = reference_trajectory(case, "float32")
    slow = reference.train(ref.spec, ref.train_spec.replace(lr=0.9 * ref.train_spec.lr), ref.initial, ref.batches)
    other = Trajectory(slow.losses, slow.grad_norms, slow.lrs, {1: slow.state})
    checks = compare_trajectories(other, ref, ref, case=case.id, subject="slow", device="cpu", precision="float32",
                                  pairwise=False, names=("slow", "reference"))
    by = {(c.quantity, c.tensor): c for c in checks}
    assert by[("train_loss", "step 1")].ok
    assert by[("train_weights", "step 1: wte.weight")].rel_l2 == pytest.approx(0.1, rel=1e-6)
    assert not by[("train_weights", "step 1: wte.weight")].ok


def test_zero_gradient_elements_are_the_key_bias_under_softmax():
    # softmax is invariant to a per-query constant, so the key bias (the middle third of c_attn.bias) has
    # an exact gradient of zero; softmax1's denominator breaks the invariance
    for attention, expect_null in (("softmax", True), ("softmax1", False)):
        spec = ModelSpec.preset("test-tiny").replace(attention=attention)
        case = TrajectoryCase("test-tiny", 0, batch=2, length=16, steps=1,
                              variant="gpt2" if attention == "softmax" else "softmax1")
        assert case.spec == spec
        ref = reference_trajectory(case, "float32")
        C = spec.n_embd
        if expect_null:
            assert set(ref.null) == {"h.0.attn.c_attn.bias"}
            mask = ref.null["h.0.attn.c_attn.bias"]
            assert mask[C:2 * C].all() and not mask[:C].any() and not mask[2 * C:].any()
        else:
            assert ref.null == {}


def test_null_elements_need_a_tensor_with_other_elements():
    state = TrainState(1, {"a": np.ones(3), "b": np.ones(2)}, {"a": np.array([1.0, 1e-20, 0.5]), "b": np.zeros(2)},
                       {"a": np.ones(3), "b": np.ones(2)})
    masks = null_elements(state)
    assert list(masks) == ["a"] and masks["a"].tolist() == [False, True, False]


def test_recipe_covers_warmup_cosine_and_floor():
    from gptspec.spec.train import lr_at

    ts = recipe(ModelSpec.preset("test-mini"), 4)
    lrs = [lr_at(ts, it) for it in range(4)]
    assert lrs[0] == ts.lr / 2 and lrs[1] == ts.lr and lrs[3] == ts.min_lr and ts.grad_clip and ts.grad_accum == 2
    ngpt = recipe(ModelSpec.preset("test-mini").replace(architecture="ngpt", positions="rope", mlp="swiglu"), 4)
    assert ngpt.decay == "none" and ngpt.weight_decay == 0 and ngpt.warmup_steps == 0


def test_micro_batches_count_different_numbers_of_targets():
    (step, *_) = TrajectoryCase("test-mini", 0, batch=2, length=32).batches()
    counted = [int((targets != -100).sum()) for _, targets in step]
    assert len(set(counted)) == len(counted)  # so the mean of means differs from the pooled mean


# -- the bounds obey the calibration rule ----------------------------------------------------------
def _bounds():
    # an uncalibrated file collects no cases here; test_trajectory_calibration_covers_... fails on it
    return [(p, h, q, m) for p in PRECISIONS for h in policy().get("trajectory", {}).get("horizons", ())
            for q in TRAJECTORY_QUANTITIES for m in METRICS]


@pytest.mark.parametrize("precision,h,quantity,metric", _bounds())
def test_trajectory_bound_is_between_2x_and_10x_of_the_measured_maximum(precision, h, quantity, metric):
    section = policy()["trajectory"]
    measured = section["measured"][precision][str(h)][quantity][metric]["value"]
    b = section["bounds"][precision][str(h)][quantity][metric]
    assert measured > 0 and b == nice_bound(measured)
    assert 2 * measured <= b <= 10 * measured


def test_bounds_grow_with_the_horizon_and_each_step_uses_the_next_horizon():
    horizons = policy()["trajectory"]["horizons"]
    assert horizons == sorted(horizons) and horizons[0] == 1
    for p in PRECISIONS:
        for q in TRAJECTORY_QUANTITIES:
            for m in METRICS:
                values = [trajectory_bound(p, h, q, m) for h in horizons]
                assert values == sorted(values), (p, q, m, values)
    assert horizon(1) == 1 and horizon(2) == horizons[1]
    with pytest.raises(KeyError, match="no trajectory bounds for step"):
        horizon(horizons[-1] + 1)


def test_trajectory_calibration_covers_every_installed_backend():
    calibrated = set(policy()["trajectory"]["calibration"]["backends"])
    missing = set(backends.available()) - calibrated
    assert not missing, f"recalibrate with {sorted(missing)}: python -m gptspec.conformance.calibrate --trajectories"


def test_spec_shows_the_calibrated_trajectory_bounds():
    from gptspec.conformance.calibrate import SPEC_FILE, TRAJ_BEGIN, TRAJ_END, trajectory_table

    shown = SPEC_FILE.read_text().split(TRAJ_BEGIN, 1)[1].split(TRAJ_END, 1)[0].strip()
    assert shown == trajectory_table(policy()["trajectory"]).strip(), "SPEC.md 20.11 is stale: recalibrate"


def test_the_weight_change_is_the_checks_exact_arithmetic_even_in_a_perturbed_run():
    """The condition estimate of a weight change perturbs the training run's operations, not the change w_k - w_0,
    which the checks compute exactly in float64: a perturbed subtraction there would also shift every later
    random rounding of the estimate (it drew the trajectory kappas 0.5 -> 0.8 on test-tiny's loss)."""
    from gptspec.conformance import trajectory
    from gptspec.spec.reference import conditioning

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 4)).astype(np.float32)
    w1 = w0 + rng.standard_normal((8, 4)) * 1e-3
    state = TrainState(1, {"w": conditioning.noisy({"w": w1})["w"]}, {}, {})
    with conditioning.perturbed(0):
        dw = trajectory._change(state, {"w": w0}, "w", None)
    assert type(dw) is np.ndarray and (dw == w1 - w0.astype(np.float64)).all()
