"""The tolerance policy obeys its own rule: every bound is 2x..10x the largest measured error."""
from __future__ import annotations

import pytest

from gptspec.conformance.calibrate import nice_bound
from gptspec.spec import DTYPES
from gptspec.spec.tolerance import METRICS, QUANTITIES, bound, policy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("metric", METRICS)
def test_bound_is_between_2x_and_10x_of_the_measured_maximum(dtype, quantity, metric):
    measured = policy()["measured"][dtype][quantity][metric]["value"]
    b = policy()["bounds"][dtype][quantity][metric]
    assert measured > 0, "a bound must come from a measurement"
    assert 2 * measured <= b <= 10 * measured, (measured, b)


def test_float32_bounds_would_see_a_gelu_variant():
    # exact vs tanh GELU differ by ~5e-4 in activations; a bound near that would hide the bug
    for quantity in ("logits", "grads"):
        for metric in METRICS:
            assert bound("float32", quantity, metric) <= 5e-5


def test_calibration_covers_every_installed_backend():
    from gptspec.backends import available

    calibrated = set(policy()["calibration"]["backends"])
    missing = set(available()) - calibrated
    assert not missing, f"recalibrate with {sorted(missing)}: python -m gptspec.conformance.calibrate"


@pytest.mark.parametrize("measured, expected", [(1.0e-6, 5e-6), (3.4e-7, 2e-6), (1.7e-3, 1e-2), (2e-4, 1e-3)])
def test_nice_bound_ladder(measured, expected):
    b = nice_bound(measured)
    assert b == expected and 3 * measured <= b <= 7.5 * measured


def test_spec_shows_the_calibrated_bounds():
    from gptspec.conformance.calibrate import BEGIN, END, SPEC_FILE, spec_table

    text = SPEC_FILE.read_text()
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == spec_table(policy()).strip(), "SPEC.md section 9 is stale: rerun the calibration"


# -- the conditioned bounds (SPEC.md 9: c x u x kappa per tensor) -------------------------------------
def _conditioned():
    section = policy().get("conditioned")
    if section is None:
        pytest.fail("spec/tolerances.json lacks the conditioned constants: "
                    "python -m gptspec.conformance.calibrate --conditioned")
    return section


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("metric", METRICS)
def test_conditioned_constant_is_3x_to_4x_the_largest_measured_ratio(dtype, quantity, metric):
    section = _conditioned()
    measured = section["measured"][dtype][quantity][metric]["value"]
    c = section["constants"][dtype][quantity][metric]
    assert measured > 0, "a constant must come from a measurement"
    assert 3 * measured * (1 - 1e-9) <= c <= 4 * measured, (measured, c)


def test_conditioned_calibration_covers_every_installed_backend():
    from gptspec.backends import available

    missing = set(available()) - set(_conditioned()["calibration"]["backends"])
    assert not missing, f"recalibrate with {sorted(missing)}: python -m gptspec.conformance.calibrate --conditioned"


@pytest.mark.parametrize("ratio, expected", [(1.0, 3.0), (0.34, 1.2), (2.1, 8.0), (0.0101, 0.04)])
def test_conditioned_ladder(ratio, expected):
    from gptspec.conformance.calibrate_conditioned import nice_constant

    c = nice_constant(ratio)
    assert c == pytest.approx(expected) and 3 * ratio <= c <= 4 * ratio


def test_spec_shows_the_conditioned_constants():
    from gptspec.conformance.calibrate import COND_BEGIN, COND_END, SPEC_FILE, conditioned_table

    shown = SPEC_FILE.read_text().split(COND_BEGIN, 1)[1].split(COND_END, 1)[0].strip()
    assert shown == conditioned_table(_conditioned()).strip(), "SPEC.md section 9 is stale: rerun the calibration"


def _trajectory_conditioned():
    section = policy().get("trajectory", {}).get("conditioned")
    if section is None:
        pytest.fail("spec/tolerances.json lacks the conditioned trajectory constants: "
                    "python -m gptspec.conformance.calibrate --trajectories --conditioned")
    return section


@pytest.mark.parametrize("precision", ("float32", "mixed_bfloat16"))
@pytest.mark.parametrize("quantity", ("train_loss", "train_grad_norm", "train_weights", "train_m", "train_v"))
@pytest.mark.parametrize("metric", METRICS)
def test_conditioned_trajectory_constant_is_3x_to_4x_the_largest_measured_ratio(precision, quantity, metric):
    section = _trajectory_conditioned()
    measured = section["measured"][precision][quantity][metric]["value"]
    c = section["constants"][precision][quantity][metric]
    assert measured > 0 and 3 * measured * (1 - 1e-9) <= c <= 4 * measured, (measured, c)


def test_conditioned_trajectory_calibration_covers_every_installed_backend():
    from gptspec.backends import available

    missing = set(available()) - set(_trajectory_conditioned()["calibration"]["backends"])
    assert not missing, f"recalibrate with {sorted(missing)}: python -m gptspec.conformance.calibrate " \
                        "--trajectories --conditioned"


def test_spec_shows_the_conditioned_trajectory_constants():
    from gptspec.conformance.calibrate import SPEC_FILE, TRAJ_COND_BEGIN, TRAJ_COND_END, conditioned_table
    from gptspec.spec.tolerance import TRAJECTORY_QUANTITIES
    from gptspec.spec.train import PRECISIONS

    shown = SPEC_FILE.read_text().split(TRAJ_COND_BEGIN, 1)[1].split(TRAJ_COND_END, 1)[0].strip()
    assert shown == conditioned_table(_trajectory_conditioned(), PRECISIONS, TRAJECTORY_QUANTITIES).strip()
