"""The conformance suite: every installed backend against the float64 reference and each other.

    from gptspec.conformance import cases, run
    outcomes = run(["torch"], cases("default"))

Also `gptspec conformance` (a table, non-zero exit on failure) and `pytest tests/`; across
machines, `artifacts.record` / `artifacts.compare` (`gptspec conformance record|compare`).
"""
from . import artifacts
from .cases import TIERS, Case, cases
from .metrics import Check, compare, errors
from .runner import Outcome, run, run_case

__all__ = ["Case", "cases", "TIERS", "Check", "compare", "errors", "Outcome", "run", "run_case", "artifacts"]
