"""The conformance suite under pytest: every installed backend x dtype x case, then every pair.

Parametrised from the registry, so a new backend is tested by this file unchanged.
    pytest tests/test_conformance.py --backend torch --dtype float32 --tier heavy
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from gptspec import backends
from gptspec.conformance import cases, run_case
from gptspec.conformance.report import failure_text
from gptspec.conformance.runner import GAPS
from gptspec.spec import DTYPES, ModelSpec, SpecError
from gptspec.spec.variants import VARIANTS, get_variant
from gptspec.weights import synthetic_params


def _selection(config):
    chosen = config.getoption("--backend") or backends.available()
    dtypes = config.getoption("--dtype") or list(DTYPES)
    variants = config.getoption("--variant") or list(VARIANTS)
    suite = cases(config.getoption("--tier"), config.getoption("--weights"), variants)
    return chosen, dtypes, suite


def pytest_generate_tests(metafunc):
    chosen, dtypes, suite = _selection(metafunc.config)
    if "backend_name" in metafunc.fixturenames:
        params = [(c, d, b) for c in suite for d in dtypes for b in chosen]
        metafunc.parametrize("case,dtype,backend_name", params,
                             ids=[f"{b}-{d}-{c.id}" for c, d, b in params])
    if "pair" in metafunc.fixturenames:
        pairs = list(combinations(chosen, 2))
        params = [(c, d, p) for c in suite for d in dtypes for p in pairs]
        ids = [f"{a}~{b}-{d}-{c.id}" for c, d, (a, b) in params]
        if not params:  # say why, rather than pytest's "empty parameter set"
            params = [pytest.param(None, None, None, marks=pytest.mark.skip(
                reason=f"pairwise checks need two backends; selected: {', '.join(chosen) or 'none'}"))]
            ids = ["no-pairs"]
        metafunc.parametrize("case,dtype,pair", params, ids=ids)


def test_backend_matches_reference(case, dtype, backend_name, request):
    backend = backends.get(backend_name)  # an unusable requested backend fails here, loudly
    outcomes = run_case([backend], case, dtype, request.config.getoption("--device"), pairwise=False)
    (outcome,) = outcomes
    if outcome.status in GAPS:
        pytest.skip(outcome.message)  # a device, variant or memory gap: shown in the summary, never a pass
    assert outcome.ok, failure_text(outcomes)


def test_backends_agree(case, dtype, pair, request):
    chosen = [backends.get(n) for n in pair]
    outcomes = run_case(chosen, case, dtype, request.config.getoption("--device"), pairwise=True)
    pairwise = [o for o in outcomes if "~" in o.subject]
    if not pairwise:
        pytest.skip("; ".join(o.message for o in outcomes if o.message))
    assert all(o.ok for o in outcomes), failure_text(outcomes)


@pytest.mark.variant("ngpt")
def test_the_one_pass_asks_statistics_of_gpt2_only(request):
    """loss_and_grads(stats=True) is defined where residual_stats is (SPEC.md 18.4): a SpecError for nGPT,
    before any computation, from every backend."""
    spec = get_variant("ngpt").apply(ModelSpec.preset("test-tiny"))
    tokens = np.zeros((1, 4), np.int64)
    for name in request.config.getoption("--backend") or backends.available():
        backend = backends.get(name)
        model = backend.build(spec, synthetic_params(spec, 0, "conformance"))
        with pytest.raises(SpecError, match="residual_stats are defined for architecture='gpt2'"):
            backend.loss_and_grads(model, tokens, tokens, stats=True)
