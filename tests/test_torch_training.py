"""Training in torch (SPEC.md 20, backends/torch/train.py) against the float64 reference, step by step.

From the same float32 weights (the reference reads them widened exactly) and the same micro-batches,
after every step k = 1..N: the loss, the pre-clip gradient norm and the lr (exactly equal), then per
tensor the moments m and v and the weight change w_k - w_0. Then determinism, resume and bad input.

The bounds are local sanity bounds, derived (the suite-wide trajectory bounds are calibrated elsewhere).
By the triangle inequality, |torch_k - ref_k| <= |torch_k - R_k| + |R_k - ref_k|, where R_k is the
reference's step k taken from torch's own state after step k-1. The second term is how the reference
itself responds to the drift of the earlier steps, computed exactly (float64). The first is one
step's rounding, bounded from the unit roundoff and the conditioning:

  * eps_loss, eps_g: the relative error of one float32 loss and of one float32 gradient, float32's
    unit roundoff times their conditioning, as the suite calibrated them for one forward/backward
    (spec/tolerances.json "loss" and "grads"; "exit_loss"/"exit_grads" for loss="early_exit").
    Under mixed_bfloat16, autocast rounds every matmul input to bfloat16 (unit roundoff u = 2^-8) and
    accumulates in float32: a product of two rounded inputs carries 2u, forward and backward each
    contribute one such product per gradient, so 4u, doubled for the chain of layers: eps_g = 8u; the
    loss, a float32 log-softmax of logits carrying u: eps_loss = u.
  * the loss: eps_loss; the grad norm: eps_g; m = b1 m' + (1 - b1) g: eps_g * ||(1 - b1) g||;
    v = b2 v' + (1 - b2) g^2: 2 eps_g * ||(1 - b2) g^2|| (g read back from R_k's moments).
  * the weight change: about 4 roundings of the float32 master weight (decay, update), 4 u32 ||w||;
    plus the gradient error through Adam's update m_hat / (sqrt(v_hat) + eps), to first order through
    m and v together, with the error spread over the tensor as rounding spreads it (eps_g * rms(g) per
    element); nGPT's renormalization carries errors of the left-out elements (below) into the rest of
    their vector. It is compared where the reference gradient is resolved, sqrt(v) > RESOLVED * eps_g *
    rms(sqrt(v)) over the tensor: below that the first order fails, the error can flip the sign of
    Adam's step (the update is ~lr sign(g) at first) and an element-wise comparison measures rounding
    noise (the attention key bias, whose exact gradient is zero; wpe rows past the batch's length).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gptspec.backends import get  # noqa: E402
from gptspec.backends.torch.train import configure_optimizer  # noqa: E402
from gptspec.spec import BackendError, ModelSpec, SpecError, TrainingDiverged, TrainSpec, lr_at, param_table  # noqa: E402
from gptspec.spec.errors import WeightsError  # noqa: E402
from gptspec.spec.reference.training import TrainState  # noqa: E402
from gptspec.spec.reference.training import train_step as reference_step  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
from gptspec.spec.train import decay_split  # noqa: E402
from gptspec.weights import synthetic_params  # noqa: E402

BACKEND = get("torch")
U32, UBF16 = 2.0**-24, 2.0**-8
# the weight change is compared where a gradient is RESOLVED times its possible error: there the first
# order holds and the error cannot flip the sign of Adam's step (module docstring)
RESOLVED = 10
N_STEPS = 4
MINI = ModelSpec.preset("test-mini")
MINI_NGPT = MINI.replace(architecture="ngpt", positions="rope", mlp="swiglu")
# warmup, cosine, clipping that acts on some steps and not others, decay, accumulation over 2
RECIPE = TrainSpec(lr=1e-2, min_lr_ratio=0.1, warmup_steps=2, max_steps=5, schedule="cosine",
                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=4.0, grad_accum=2)
NGPT_RECIPE = TrainSpec.preset("ngpt").replace(lr=1e-2, max_steps=5, grad_accum=2, grad_clip=0.215,
                                               precision="float32")
CASES = {
    "gpt2": (MINI, RECIPE),
    "ngpt": (MINI_NGPT, NGPT_RECIPE),
    "learned_sinks": (MINI.replace(attention="learned_sinks"), RECIPE),
    "early_exit": (MINI.replace(loss="early_exit"), RECIPE),
    "gpt2-mixed_bfloat16": (MINI, RECIPE.replace(precision="mixed_bfloat16")),
    "ngpt-mixed_bfloat16": (MINI_NGPT, NGPT_RECIPE.replace(precision="mixed_bfloat16")),
}


def make_data(spec, ts, n_steps, seed, B=2, T=16):
    rng = np.random.default_rng(seed)
    batches = [[(rng.integers(0, spec.vocab_size, (B, T)), rng.integers(0, spec.vocab_size, (B, T)))
                for _ in range(ts.grad_accum)] for _ in range(n_steps)]
    if spec.loss != "early_exit":
        return batches, None
    # Exit decisions (draw < p_max) are discontinuous in the weights. p_max >= 1/vocab_size > 1e-3 always,
    # so a draw below 1e-3 always exits and one above 0.95 stays (p_max stays far below 0.95 here):
    # float32 and float64 take the same decisions, and both branches are exercised.
    draws = [[np.where(rng.random((spec.n_layer, B, T)) < 0.5, rng.uniform(0, 1e-3, (spec.n_layer, B, T)),
                       rng.uniform(0.95, 1.0, (spec.n_layer, B, T))).astype(np.float32)
              for _ in range(ts.grad_accum)] for _ in range(n_steps)]
    return batches, draws


def one_step_errors(spec, ts):
    """(eps_loss, eps_g): the relative error of one loss and of one gradient (module docstring)."""
    if ts.precision == "mixed_bfloat16":
        return UBF16, 8 * UBF16
    exit_ = spec.loss == "early_exit"
    return (bound("float32", "exit_loss" if exit_ else "loss", "rel_l2"),
            bound("float32", "exit_grads" if exit_ else "grads", "rel_l2"))


def _rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def weight_change_check(ref: TrainState, got: TrainState, local: TrainState, before: TrainState, w0, ts, k, lr,
                        eps_g, unit_norm_axes):
    """Per tensor: (relative error of w_k - w_0 over the resolved elements, its bound) (module docstring)."""
    b1, b2 = ts.betas
    out = {}
    for name, w in w0.items():
        scale = np.sqrt(ref.v[name])
        keep = scale > RESOLVED * eps_g * _rms(scale)
        if not keep.any():
            continue
        change = np.linalg.norm(ref.params[name][keep] - w[keep])
        err = np.linalg.norm(got.params[name][keep] - ref.params[name][keep]) / change
        g = (local.m[name] - b1 * before.m[name])[keep] / (1 - b1)  # this step's (clipped) gradient
        v_hat = local.v[name][keep] / (1 - b2**k)
        m_hat, den = local.m[name][keep] / (1 - b1**k), np.sqrt(v_hat) + ts.eps
        # d(m_hat / den) / dg through m (1 - b1) g and v (1 - b2) g^2 together, first order
        slope = (1 - b1) / ((1 - b1**k) * den) - (m_hat / den) * (1 - b2) * g / ((1 - b2**k) * np.sqrt(v_hat) * den)
        this_step = (4 * U32 * np.linalg.norm(before.params[name][keep])
                     + lr * eps_g * _rms(g) * np.linalg.norm(slope))
        if unit_norm_axes.get(name) is not None:
            # nGPT rescales each vector to unit norm after the step: an unresolved element's step, even
            # of the wrong sign (an error of 2 |step|), changes its vector's norm by up to 2 |w step|
            # (first order), which rescales the resolved elements of that vector too
            axis, w_new = unit_norm_axes[name], local.params[name]
            step = np.abs(w_new - before.params[name]) * ~keep
            leak = np.sum(2 * step * np.abs(w_new), axis=axis, keepdims=True)
            this_step += np.linalg.norm(leak * np.sqrt(np.sum(w_new**2 * keep, axis=axis, keepdims=True)))
        carried = np.linalg.norm(local.params[name][keep] - ref.params[name][keep])
        out[name] = (float(err), float((this_step + carried) / change))
    return out


def run_both(case, seed, n_steps=N_STEPS):
    """Per step k: (torch stats, torch state, reference stats, reference state, and the reference's step
    taken from torch's state before step k: its stats and state)."""
    spec, ts = CASES[case]
    batches, draws = make_data(spec, ts, n_steps, seed)
    w0 = synthetic_params(spec, seed, "conformance")
    model = BACKEND.build(spec, w0)
    optimizer = BACKEND.optimizer(model, ts)
    ref = TrainState.initial(spec, w0)  # the float32 weights, widened exactly
    steps = []
    for it in range(n_steps):
        d = None if draws is None else draws[it]
        before = BACKEND.optimizer_state(model, optimizer)
        local = before.copy()
        local_stats = reference_step(spec, ts, local, batches[it], d)
        stats = BACKEND.train_step(model, optimizer, ts, it, batches[it], d)
        ref_stats = reference_step(spec, ts, ref, batches[it], d)
        steps.append((stats, BACKEND.optimizer_state(model, optimizer), ref_stats, ref.copy(), local_stats,
                      local, before))
    return w0, steps


def trajectory_errors(case, w0, steps):
    """Per step k: {quantity: (worst error, bound)}, the worst by error / bound over the tensors."""
    spec, ts = CASES[case]
    eps_loss, eps_g = one_step_errors(spec, ts)
    b1, b2 = ts.betas
    table = []
    for k, (stats, got, ref_stats, ref, local_stats, local, before) in enumerate(steps, 1):
        (ref_loss, ref_norm, ref_lr), (local_loss, local_norm, _) = ref_stats, local_stats
        assert stats.lr == ref_lr == lr_at(ts, k - 1)  # the same float64 number, pushed into torch
        assert got.step == ref.step == k
        row = {"loss": (abs(stats.loss - ref_loss) / abs(ref_loss), eps_loss + abs(local_loss - ref_loss) / abs(ref_loss)),
               "grad_norm": (abs(stats.grad_norm - ref_norm) / ref_norm, eps_g + abs(local_norm - ref_norm) / ref_norm)}
        for q, beta, factor in (("m", b1, 1), ("v", b2, 2)):
            rows = []
            for n, a in getattr(ref, q).items():
                new, old = getattr(local, q)[n], getattr(before, q)[n]
                this_step = factor * eps_g * np.linalg.norm(new - beta * old)  # (1 - beta) * (g or g*g)
                rows.append((_rel(getattr(got, q)[n], a), (this_step + np.linalg.norm(new - a)) / np.linalg.norm(a)))
            row[q] = max(rows, key=lambda e: e[0] / e[1])
        axes = {info.name: info.unit_norm_axis for info in param_table(spec)}
        dw = weight_change_check(ref, got, local, before, w0, ts, k, ref_lr, eps_g, axes)
        row["weight_change"] = max(dw.values(), key=lambda e: e[0] / e[1])
        table.append(row)
    return table


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_the_float64_reference(case):
    w0, steps = run_both(case, seed=0)
    for k, row in enumerate(trajectory_errors(case, w0, steps), 1):
        for quantity, (err, limit) in row.items():
            assert err <= limit, f"{case}, step {k}: {quantity} error {err:.3g} > bound {limit:.3g}"
    # both branches of clipping ran: clipped steps and unclipped ones
    norms = [step[2][1] for step in steps]
    assert min(norms) < CASES[case][1].grad_clip < max(norms), norms
    # the comparison means something: every tensor moved by far more than float32 rounding
    moved = min(_rel(steps[0][3].params[n], np.asarray(w, np.float64)) for n, w in w0.items())
    assert moved > 1e-4, moved


def test_the_optimizer_is_torchs_adamw_configured_to_the_spec():
    model = BACKEND.build(MINI, synthetic_params(MINI, 0, "conformance"))
    optimizer = configure_optimizer(model, RECIPE)
    assert type(optimizer) is torch.optim.AdamW
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, kept = decay_split(MINI, RECIPE)
    groups = [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [(list(decayed), 0.1), (list(kept), 0.0)]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and not g["fused"] for g in optimizer.param_groups)
    ngpt = BACKEND.build(MINI_NGPT, synthetic_params(MINI_NGPT, 0, "conformance"))
    only = configure_optimizer(ngpt, NGPT_RECIPE).param_groups  # decay="none": one group, no decay
    assert len(only) == 1 and only[0]["weight_decay"] == 0.0 and len(only[0]["params"]) == len(param_table(MINI_NGPT))


def test_ngpt_weights_are_unit_norm_after_each_step():
    w0, steps = run_both("ngpt", 1, 2)
    for _, got_state, *_ in steps:
        for info in param_table(MINI_NGPT):
            if info.unit_norm_axis is not None:
                norms = np.linalg.norm(got_state.params[info.name], axis=info.unit_norm_axis)
                np.testing.assert_allclose(norms, 1.0, rtol=4 * U32 * np.sqrt(MINI.n_embd), err_msg=info.name)


# -- determinism and resume (llm.c's check) ----------------------------------------------------------
def _fresh_run(case, batches, draws, seed=0):
    spec, ts = CASES[case]
    return BACKEND.train(BACKEND.build(spec, synthetic_params(spec, seed, "conformance")), ts, batches, draws)


def _assert_same_state(a: TrainState, b: TrainState):
    assert a.step == b.step
    for group in ("params", "m", "v"):
        for n, x in getattr(a, group).items():
            assert np.array_equal(getattr(b, group)[n], x), (group, n)


@pytest.mark.parametrize("case", ["gpt2", "gpt2-mixed_bfloat16", "ngpt"])
def test_two_identical_runs_are_bitwise_identical(case):
    spec, ts = CASES[case]
    batches, draws = make_data(spec, ts, N_STEPS, seed=3)
    a, b = _fresh_run(case, batches, draws), _fresh_run(case, batches, draws)
    assert a.losses == b.losses and a.grad_norms == b.grad_norms and a.lrs == b.lrs
    _assert_same_state(a.state, b.state)


@pytest.mark.parametrize("case", ["gpt2", "gpt2-mixed_bfloat16", "ngpt", "early_exit"])
def test_resume_from_the_optimizer_state_is_bitwise(case):
    """N steps == N/2 steps, the state, a fresh model built from state.params with an optimizer from the
    state, and N/2 more."""
    spec, ts = CASES[case]
    batches, draws = make_data(spec, ts, N_STEPS, seed=4)
    half = N_STEPS // 2
    full = _fresh_run(case, batches, draws)
    first = _fresh_run(case, batches[:half], None if draws is None else draws[:half])
    state = first.state
    assert state.step == half
    model = BACKEND.build(spec, {n: a.astype(np.float32) for n, a in state.params.items()})
    rest = BACKEND.train(model, ts, batches[half:], None if draws is None else draws[half:], state=state)
    assert first.losses + rest.losses == full.losses
    assert first.grad_norms + rest.grad_norms == full.grad_norms
    assert first.lrs + rest.lrs == full.lrs
    _assert_same_state(full.state, rest.state)


def test_the_state_before_any_step_is_zero_moments_at_step_0():
    model = BACKEND.build(MINI, synthetic_params(MINI, 0, "conformance"))
    state = BACKEND.optimizer_state(model, BACKEND.optimizer(model, RECIPE))
    assert state.step == 0
    assert all(not a.any() for group in (state.m, state.v) for a in group.values())
    assert all(np.array_equal(state.params[n], a) for n, a in synthetic_params(MINI, 0, "conformance").items())


# -- bad input ---------------------------------------------------------------------------------------
def test_an_optimizer_state_that_does_not_fit_the_model_is_named():
    model = BACKEND.build(MINI, synthetic_params(MINI, 0, "conformance"))
    good = TrainState.initial(MINI, synthetic_params(MINI, 0, "conformance"))
    bad = good.copy()
    bad.m["h.1.mlp.c_fc.weight"] = bad.m["h.1.mlp.c_fc.weight"][:, :3]
    with pytest.raises(WeightsError, match=r"first moments.*h.1.mlp.c_fc.weight: expected \(256, 64\), got \(256, 3\)"):
        BACKEND.optimizer(model, RECIPE, bad)
    bad = good.copy()
    bad.v["ln_f.wieght"] = bad.v.pop("ln_f.weight")
    with pytest.raises(WeightsError, match=r"second moments.*missing 1 tensor\(s\): ln_f.weight.*unexpected.*ln_f.wieght"):
        BACKEND.optimizer(model, RECIPE, bad)
    with pytest.raises(SpecError, match="train_spec must be a TrainSpec"):
        BACKEND.optimizer(model, {"lr": 1e-3})
    bf16 = BACKEND.build(MINI, synthetic_params(MINI, 0, "conformance"), dtype="bfloat16")
    with pytest.raises(BackendError, match="float32 master weights.*holds bfloat16 parameters"):
        BACKEND.optimizer(bf16, RECIPE)


def _snapshot(model, optimizer):
    s = BACKEND.optimizer_state(model, optimizer)
    return s.step, {g: {n: a.copy() for n, a in getattr(s, g).items()} for g in ("params", "m", "v")}


def _assert_unchanged(before, after):
    assert before[0] == after[0]
    for g in ("params", "m", "v"):
        for n, a in before[1][g].items():
            assert np.array_equal(after[1][g][n], a, equal_nan=True), (g, n)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference meets the NaN too
def test_a_nan_weight_stops_training_at_that_step_naming_the_reference_tensor():
    from gptspec.spec.reference import train as reference_train

    batches, _ = make_data(MINI, RECIPE, 2, seed=5)
    model = BACKEND.build(MINI, synthetic_params(MINI, 0, "conformance"))
    optimizer = BACKEND.optimizer(model, RECIPE)
    BACKEND.train_step(model, optimizer, RECIPE, 0, batches[0])
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    before = _snapshot(model, optimizer)
    with pytest.raises(TrainingDiverged, match="it=1") as e:
        BACKEND.train_step(model, optimizer, RECIPE, 1, batches[1])
    _assert_unchanged(before, _snapshot(model, optimizer))
    state = TrainState(1, before[1]["params"], before[1]["m"], before[1]["v"])
    with pytest.raises(TrainingDiverged) as ref:
        reference_train(MINI, RECIPE, state, batches[1:])
    assert (e.value.step, e.value.tensor) == (ref.value.step, ref.value.tensor) == (1, "wte.weight")


def test_the_first_non_finite_gradient_is_named_before_clipping_spreads_it():
    """One gradient goes NaN (a hook, as an overflow in one layer would): clip_grad_norm_ would multiply
    every gradient by the NaN coefficient, so the error must be raised from the norm, before any scaling."""
    batches, _ = make_data(MINI, RECIPE, 1, seed=6)
    model = BACKEND.build(MINI, synthetic_params(MINI, 0, "conformance"))
    optimizer = BACKEND.optimizer(model, RECIPE)
    model.h[1].attn.c_proj.weight.register_hook(lambda g: g * float("nan"))
    before = _snapshot(model, optimizer)
    with pytest.raises(TrainingDiverged, match=r"it=0: the gradient of 'h.1.attn.c_proj.weight' is not finite") as e:
        BACKEND.train_step(model, optimizer, RECIPE, 0, batches[0])
    assert (e.value.step, e.value.tensor) == (0, "h.1.attn.c_proj.weight")
    _assert_unchanged(before, _snapshot(model, optimizer))
