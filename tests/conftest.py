"""Options shared by the test suite: which backends, dtypes, tier, device and real weights."""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("gptspec")
    g.addoption("--backend", action="append", default=None,
                help="run conformance for this backend only (repeatable; default: every installed one)")
    g.addoption("--dtype", action="append", default=None,
                help="run conformance in this dtype only (repeatable; default: float32, bfloat16, float16)")
    g.addoption("--tier", default="default", choices=("default", "heavy"),
                help="heavy adds more seeds, long sequences and every GPT-2 preset")
    g.addoption("--device", default=None, help="device for every backend (default: each backend's best)")
    g.addoption("--weights", default=None,
                help="real GPT-2 weights (name or path) for an extra conformance case")


@pytest.fixture(scope="session")
def tier(request):
    return request.config.getoption("--tier")
