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
    g.addoption("--variant", action="append", default=None,
                help="run conformance for this variant only (repeatable; default: every variant)")
    g.addoption("--weights", default=None,
                help="real GPT-2 weights (name or path) for an extra conformance case")
    g.addoption("--artifacts", default=None, metavar="DIR",
                help="check every conformance artifact in DIR (gptspec conformance record) against the "
                     "reference and this machine's backends (tests/test_artifacts.py)")


@pytest.fixture(scope="session")
def tier(request):
    return request.config.getoption("--tier")


def pytest_collection_modifyitems(config, items):
    """Group the conformance tests by (case, dtype): each backend's run is cached for the current
    (case, dtype) only, so the pairwise tests reuse the runs of the tests beside them."""
    groups: dict[tuple, int] = {}

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "case" not in params or params["case"] is None:
            return (len(groups) + 1_000_000,)  # not a conformance test: keep its place after them
        g = groups.setdefault((params["case"].id, params["dtype"]), len(groups))
        return (g,)

    conformance = [i for i in items if i.fspath.basename == "test_conformance.py"]
    if conformance:
        first = items.index(conformance[0])
        rest = [i for i in items if i.fspath.basename != "test_conformance.py"]
        ordered = sorted(conformance, key=key)  # stable: within a group, the collection order
        items[:] = rest[:first] + ordered + rest[first:]
