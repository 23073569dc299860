"""Options shared by the test suite: which backends, dtypes, tier, device, variants and real weights.

Two selections apply to every test module, not to one:
- `--variant V` keeps, of the tests that concern a variant, those of V: a test concerns a variant
  when it has a parameter (or parametrized fixture) named `variant` holding a variant's name, or
  a `@pytest.mark.variant(name, ...)` marker; the others are deselected. Tests of no variant stay.
- `--backend B` chooses the backends of the `backend` fixture (default: every installed one).
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("gptspec")
    g.addoption("--backend", action="append", default=None,
                help="test this backend only (repeatable; default: every installed one)")
    g.addoption("--dtype", action="append", default=None,
                help="run conformance in this dtype only (repeatable; default: float32, bfloat16, float16)")
    g.addoption("--tier", default="default", choices=("default", "heavy"),
                help="heavy adds more seeds, long sequences and every GPT-2 preset")
    g.addoption("--device", default=None, help="device for every backend (default: each backend's best)")
    g.addoption("--variant", action="append", default=None,
                help="run the tests of this variant only, in every module (repeatable; default: every variant)")
    g.addoption("--weights", default=None,
                help="real GPT-2 weights (name or path) for an extra conformance case")
    g.addoption("--artifacts", default=None, metavar="DIR",
                help="check every conformance artifact in DIR (gptspec conformance record) against the "
                     "reference and this machine's backends (tests/test_artifacts.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "variant(*names): the test concerns these variants (spec/variants.py); "
                                       "--variant deselects it unless one of them is chosen")
    chosen = config.getoption("--variant")
    if chosen:
        from gptspec.spec import SpecError
        from gptspec.spec.variants import get_variant

        for name in chosen:
            try:
                get_variant(name)  # an unknown name fails here, with the known ones, not as "0 selected"
            except SpecError as e:
                raise pytest.UsageError(f"--variant: {e}") from None


@pytest.fixture(scope="session")
def tier(request):
    return request.config.getoption("--tier")


# -- the backends under test ------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    defs = metafunc._arg2fixturedefs.get("backend") or ()
    if "backend" in metafunc.fixturenames and not (defs and defs[-1].params):  # a module's own params win
        from helpers import selected_backends

        names = selected_backends(metafunc.config)
        metafunc.parametrize("backend", names or [pytest.param(None, marks=pytest.mark.skip(
            reason="no backend is installed and usable here"))], indirect=True)


@pytest.fixture
def backend(request):
    """The Backend object of one installed backend (parametrized over every one)."""
    from gptspec import backends

    return backends.get(request.param)


# -- collection: --variant, then the conformance tests grouped ---------------------------------------
def variants_of(item) -> set[str]:
    """The variants a collected test concerns (empty: none in particular)."""
    from gptspec.spec.variants import VARIANTS

    names = set()
    for mark in item.iter_markers("variant"):
        names.update(mark.args)
    value = getattr(getattr(item, "callspec", None), "params", {}).get("variant")
    if isinstance(value, str) and value in VARIANTS:
        names.add(value)
    return names


def deselect_other_variants(config, items) -> None:
    chosen = config.getoption("--variant")
    if not chosen:
        return
    kept, dropped = [], []
    for item in items:
        concerns = variants_of(item)
        (dropped if concerns and not concerns & set(chosen) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def group_conformance_tests(items) -> None:
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


def pytest_collection_modifyitems(config, items):
    deselect_other_variants(config, items)
    group_conformance_tests(items)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Character-level token shards of the vendored Shakespeare slice (`gptspec data prepare
    shakespeare-slice --tokenizer char`), shared read-only by the training tests."""
    from gptspec.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "shk_char"
    prepare(["shakespeare-slice"], out, tokenizer="char")
    return out
