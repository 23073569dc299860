"""The condition estimates behind the per-tensor bounds (spec/reference/conditioning.py, SPEC.md 9).

Monte Carlo arithmetic is checked against the first-order error analysis it estimates, in closed form:
for y = sum_i a_i b_i with every product and the sum rounded once (relative errors uniform in [-d, d],
variance d^2/3), the error is d * (sum_i a_i b_i r_i + y r_0), so its root mean square over many draws is
d * sqrt((sum_i (a_i b_i)^2 + y^2) / 3) and kappa = that / (d |y|).
"""
from __future__ import annotations

import numpy as np
import pytest

from gptspec.conformance.cases import Case
from gptspec.spec import reference
from gptspec.spec.reference import conditioning
from gptspec.spec.tolerance import UNIT_ROUNDOFF, conditioned_bound, effective_kappa, policy


def _dot(a, b):
    return lambda noisy: {"y": (conditioning.noisy({"a": a})["a"] if noisy else a) * b}


@pytest.mark.parametrize("cancel", [False, True])
def test_kappa_of_a_dot_product_is_the_first_order_analysis(cancel):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 1.5, 64), rng.uniform(0.5, 1.5, 64)
    if cancel:  # terms of both signs summing to far less than their sizes: ill-conditioned
        b[::2] *= -1
    terms = a * b
    y = terms.sum()
    expected = np.sqrt((np.sum(terms ** 2) + y ** 2) / 3) / abs(y)
    k = conditioning.estimate(lambda noisy: {"y": _dot(a, b)(noisy)["y"].sum()}, samples=400, seed=1)["y"][0]
    assert k == pytest.approx(expected, rel=0.1), (k, expected)


def test_kappa_is_linear_in_the_perturbation():
    # first order: the same draws at a thousandth of the perturbation give the same kappa
    case = Case("test-tiny", 0, batch=3, length=16)
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    p = {n: np.asarray(a, np.float64) for n, a in ckpt.params.items()}

    def loss(noisy):
        return {"loss": reference.gpt2.loss_and_grads(ckpt.spec, conditioning.noisy(p) if noisy else p,
                                                      tokens, targets)[0]}

    k1, k2 = (conditioning.estimate(loss, samples=1, delta=d)["loss"][0] for d in (2.0 ** -30, 2.0 ** -40))
    assert k1 > 0 and k2 == pytest.approx(k1, rel=1e-2)


def test_exact_operations_round_nothing():
    x = np.array([3.0, -1.0, 2.0])
    k = conditioning.estimate(lambda noisy: {
        "max": (conditioning.noisy({"x": x})["x"] if noisy else x).max(keepdims=True),
        "abs": np.abs(conditioning.noisy({"x": x})["x"] if noisy else x),
        "neg": -(conditioning.noisy({"x": x})["x"] if noisy else x)})
    assert all(v == (0.0, 0.0) for v in k.values()), k


def test_estimating_leaves_the_reference_exact():
    case = Case("test-tiny", 0, batch=3, length=16)
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    before = reference.loss_and_grads(ckpt.spec, ckpt.params, tokens, targets)
    k = reference.condition(ckpt.spec, ckpt.params, tokens, targets)
    after = reference.loss_and_grads(ckpt.spec, ckpt.params, tokens, targets)
    assert before.loss == after.loss and all(np.array_equal(before.grads[n], after.grads[n]) for n in before.grads)
    assert set(k) >= {"logits", "loss", *before.grads} and all(v[0] > 0 for v in k.values())


def test_a_sum_of_cancelling_terms_gets_a_large_kappa():
    # SPEC.md 9's worst-conditioned tensors: a gradient summed over few positions whose terms cancel (a LayerNorm
    # bias of layer 0) must get a larger kappa than the logits, which no sum cancels
    case = Case("test-tiny", 0, batch=3, length=16)
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    k = reference.condition(ckpt.spec, ckpt.params, tokens, targets)
    assert max(k[n][0] for n in k if n.startswith("h.0.")) > 1.5 * k["logits"][0]


@pytest.mark.skipif("conditioned" not in policy(), reason="spec/tolerances.json holds no conditioned constants")
def test_a_check_bound_is_c_times_u_times_kappa():
    from gptspec.backends import available, get
    from gptspec.conformance import runner

    backend = get(available()[0])
    case = Case("test-tiny", 0, batch=3, length=16)
    (out, *_) = runner.run_case([backend], case, "bfloat16", pairwise=False)
    kappa = runner.conditioning(case)
    for c in out.checks:
        c_l2 = policy()["conditioned"]["constants"]["bfloat16"][c.quantity]["rel_l2"]
        assert c.bound_l2 == pytest.approx(c_l2 * UNIT_ROUNDOFF["bfloat16"] * effective_kappa("bfloat16", "rel_l2",
                                                                                               kappa[c.tensor]))
        assert c.bound_l2 == conditioned_bound("bfloat16", c.quantity, "rel_l2", c.kappa_l2)
    assert len({c.bound_l2 for c in out.checks if c.quantity == "grads"}) > 1  # one bound per tensor
    runner.release()


def test_the_absolute_perturbation_adds_up_to_eta_where_a_result_is_not_zero():
    # gradual underflow's error (SPEC.md 9): absolute, uniform in [-eta, eta], and none on an exact 0 (which
    # stores exactly)
    rng = np.random.default_rng(3)
    x = np.zeros(40000)
    x[::2] = rng.uniform(-1e-5, 1e-5, 20000)
    eta = conditioning.ETA
    with conditioning.perturbed(0, eta, absolute=True):
        noisy = conditioning.noisy({"x": x})["x"]
        fresh = (noisy * 1.0).view(np.ndarray)      # a new result
        in_place = noisy.copy()
        np.multiply(in_place, 1.0, out=in_place)    # a result written into its operand
        total = float(np.sum(noisy))                # a scalar
        zero = float(np.sum(noisy[1::2]))           # a scalar that is exactly 0
    for y in (fresh, in_place.view(np.ndarray)):
        assert (y[1::2] == 0).all() and np.signbit(y[1::2]).sum() == 0
        err = y[::2] - x[::2]
        assert np.abs(err).max() <= eta
        # 20000 draws: the RMS's own spread is ~0.5%; the pool's offsets, (1 + eta r) - 1 in float64, put it 1% off
        assert np.sqrt(np.mean(err ** 2)) == pytest.approx(eta / np.sqrt(3), rel=0.05)
    assert abs(total - x.sum()) <= eta  # one error, the sum's own (each term's would add up to ~80 eta)
    assert zero == 0
