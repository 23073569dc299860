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
