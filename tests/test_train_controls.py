"""Training negative controls (SPEC.md 20.11): each broken torch training step is flagged by the trajectory
checks, while the correct torch step, and the spec's AdamW written out by hand, pass the same checks."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

from gptspec.conformance.train_controls import CONTROLS, POSITIVE, control_case, run_control  # noqa: E402
from gptspec.conformance.trajectory import run_trajectory  # noqa: E402


@pytest.mark.parametrize("control", CONTROLS, ids=[c.name for c in CONTROLS])
def test_broken_training_step_is_flagged(control):
    result = run_control(control)
    assert not result.message, result.message
    assert result.correct_ok, f"the correct torch training fails {result.case}"
    assert result.flagged, f"{control.name} passed every trajectory check (worst ratio {result.worst_ratio:.3g})"
    assert result.worst_ratio > 1 and not math.isnan(result.worst_ratio)


def test_the_spec_adamw_written_out_passes():
    # the controls' optimizer with every switch off is the spec's AdamW: it must pass, so that each control's
    # failure comes from its one switch, not from the hand-written optimizer
    (outcome,) = run_trajectory([POSITIVE.backend()], control_case(POSITIVE), "float32", "cpu", pairwise=False)
    assert outcome.status == "ran", outcome.message
    assert outcome.ok, [f"{c.quantity} {c.tensor} {c.worst_ratio:.3g}" for c in outcome.failures]
