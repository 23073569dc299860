"""The conformance suite: every installed backend against the float64 reference and each other.

    from gptspec.conformance import cases, run
    outcomes = run(["torch"], cases("default"))

Also `gptspec conformance` (tables, the training trajectories' among them; non-zero exit on failure) and `pytest tests/`; across
machines, `crossmachine.record` / `crossmachine.compare` (`gptspec conformance record|compare`), the
artifact files themselves in `artifact_file`.
"""
from . import artifact_file, crossmachine
from .cases import TIERS, Case, cases
from .metrics import Check, compare, errors
from .runner import Outcome, run, run_case
from .trajectory import run_trajectories, trajectory_cases

__all__ = ["Case", "cases", "TIERS", "Check", "compare", "errors", "Outcome", "run", "run_case", "artifact_file",
           "crossmachine", "trajectory_cases", "run_trajectories"]
