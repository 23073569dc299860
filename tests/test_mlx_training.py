"""MLX training (SPEC.md section 20) against the float64 reference, and its determinism and resume.

From the same float32 weights and batches, the MLX backend's per-step loss, grad norm and lr, and
after 1 and N steps its weights, m and v, are compared with spec.reference.train (float64). Weights
are compared through their change w_k - w_0 per tensor: after a few steps the weights have moved by
~k*lr, a small part of their size, and ||w - w_ref|| / ||w|| would hide a wrong step.

The local bounds are roundoff times a conditioning derived from the reference run itself
(`reference_with_budget`): per element, a gradient error of C_GRAD * u * t * max|g| at step t
(roundoff relative to the tensor's largest gradient, as cancellation leaves it, growing with the
rounding the weights gathered before) is carried through the moments and Adam's division (where a
gradient is ~0, Adam turns its rounding into a move of ~lr: the budget grows there as
1 / (sqrt(v_hat) + eps)); each update and each stored weight rounds to float32; MLX's float32 bias
corrections (backends/mlx/train.py) add their exactly computed deviation. C_GRAD, the conditioning
of a gradient in these models, is the one measured constant (the worst over every case, seeds 0-2
and both checkpoints, times ~2.5). The loss and grad norm have fixed budgets in u, measured the same
way. mixed_bfloat16 puts bfloat16's u = 2^-8 in the gradient term: its weight-change check is weak
(after one step an element whose gradient is below bfloat16's error of the tensor's largest one
moves by ~lr either way; measured 0.25 relative on test-mini's ln_f.weight), so its loss, grad norm,
m and v carry the comparison. The suite-wide calibration (conformance/trajectory.py) is separate.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from gptspec.backends import get  # noqa: E402
from gptspec.spec import ModelSpec, TrainingDiverged, TrainSpec, param_table  # noqa: E402
from gptspec.spec.errors import WeightsError  # noqa: E402
from gptspec.spec.reference import TrainResult, TrainState, train  # noqa: E402
from gptspec.spec.reference.training import train_step as reference_step  # noqa: E402
from gptspec.weights import round_to_dtype, synthetic_params  # noqa: E402

MLX = get("mlx")
TINY = ModelSpec.preset("test-tiny")
MINI = ModelSpec.preset("test-mini")
U32, U16 = 2.0 ** -24, 2.0 ** -8
C_GRAD = {"float32": 128, "mixed_bfloat16": 8}  # gradient conditioning: measured worst 51 and 1.8
# per step, relative, in the compute dtype's u: measured worst 25 and 0.26 (loss), 71 and 1.3 (grad norm)
LOSS_BUDGET = {"float32": 64, "mixed_bfloat16": 1}
NORM_BUDGET = {"float32": 256, "mixed_bfloat16": 4}

# Clipping (hit: norms of ~1-3 against 0.7), decay, a warmup, the cosine, a step past max_steps, accumulation.
RECIPE = TrainSpec(lr=1e-2, min_lr_ratio=0.1, warmup_steps=2, max_steps=5, schedule="cosine",
                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=0.7, grad_accum=2)
STEPS = 6

# name -> (model spec, train spec); each trains with every draw input its loss needs
CASES = {
    "gpt2": (MINI, RECIPE),
    # torch's default betas (0.9, 0.999): where MLX's float32 bias correction shows (train.py)
    "gpt2-betas-0.999": (TINY, TrainSpec(lr=1e-2, weight_decay=0.1, grad_accum=2)),
    "ngpt": (TINY.replace(architecture="ngpt", positions="rope", mlp="swiglu"),
             TrainSpec.preset("ngpt").replace(lr=1e-2, max_steps=5, grad_accum=2, precision="float32")),
    "learned_sinks": (TINY.replace(attention="learned_sinks"), RECIPE),
    "early_exit": (TINY.replace(n_layer=3, loss="early_exit"), RECIPE),
    "mixed_bfloat16": (MINI, RECIPE.replace(precision="mixed_bfloat16")),
}


def start_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """The reference and MLX start from the same float32 weights."""
    return {n: round_to_dtype(a, "float32").astype(np.float32)
            for n, a in synthetic_params(spec, seed, "conformance").items()}


def make_batches(spec: ModelSpec, train_spec: TrainSpec, n_steps: int, seed: int, B=2, T=8):
    rng = np.random.default_rng(1000 + seed)
    V, n = spec.vocab_size, train_spec.grad_accum
    batches = [[(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)] for _ in range(n_steps)]
    draws = None
    if spec.loss == "early_exit":
        draws = [[rng.random((spec.n_layer, B, T)) for _ in range(n)] for _ in range(n_steps)]
    return batches, draws


def _key_bias_free(spec: ModelSpec, name: str, a: np.ndarray) -> np.ndarray:
    """Under plain softmax the attention key bias has an exact gradient of zero (a constant added to a
    query's every logit): its moves are rounding noise amplified by Adam to ~lr in any implementation,
    so the weight-change metric leaves that slice out (its m and v, ~0, stay in the moment checks).
    A sink (softmax1, softmax_c, learned_sinks) is not shifted with the keys: there it is checked."""
    if (spec.architecture == "gpt2" and spec.attention == "softmax" and name.endswith("attn.c_attn.bias")
            and spec.attention_values == "projected"):
        C = spec.n_embd
        return np.concatenate([a[:C], a[2 * C:]])
    return a


def _f32(x: float) -> float:
    return float(np.float32(x))


def reference_with_budget(spec, train_spec, w0, batches, draws, checkpoints):
    """spec.reference.train, step by step, and the float32 run's error budget (module docstring):
    (result, {k: (the state after step k, {"change"|"m"|"v": {name: the budget's norm}})} for k in
    checkpoints). The budget adds magnitudes: an upper estimate to first order."""
    b1, b2 = train_spec.betas
    eps = train_spec.eps
    u_grad = (U16 if train_spec.precision == "mixed_bfloat16" else U32) * C_GRAD[train_spec.precision]
    state, result, at = TrainState.initial(spec, w0), TrainResult(), {}
    dm, dv, dw = ({n: np.zeros_like(a) for n, a in state.params.items()} for _ in range(3))
    for i, micro_batches in enumerate(batches):
        m_before = {n: a.copy() for n, a in state.m.items()}
        loss, norm, lr = reference_step(spec, train_spec, state, micro_batches, None if draws is None else draws[i])
        result.losses.append(loss), result.grad_norms.append(norm), result.lrs.append(lr)
        t = state.step
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        # MLX's constants: lr, beta1 and beta2 as float32 in its bias corrections (train.py's docstring)
        bc1_mlx, bc2_mlx = 1 - _f32(b1) ** t, 1 - _f32(b2) ** t
        for n, p in state.params.items():
            m, v = state.m[n], state.v[n]
            g = (m - b1 * m_before[n]) / (1 - b1)  # the step's clipped gradient
            # its error: roundoff relative to the tensor's largest gradient (cancellation), growing
            # with the rounding the weights have gathered over the t - 1 steps before
            dg = u_grad * t * np.abs(g).max()
            dm[n] = b1 * dm[n] + (1 - b1) * dg
            dv[n] = b2 * dv[n] + (1 - b2) * 2 * np.abs(g) * dg
            sqrt_v = np.sqrt(v)
            denom = sqrt_v / np.sqrt(bc2) + eps
            update = lr / bc1 * m / denom
            update_mlx = _f32(lr) / bc1_mlx * m / (sqrt_v / np.sqrt(bc2_mlx) + eps)
            d_sqrt_v = np.minimum(dv[n] / (2 * np.maximum(sqrt_v, 1e-300)), np.sqrt(dv[n]))
            dw[n] = (dw[n] + lr / bc1 * (dm[n] + np.abs(m) * d_sqrt_v / (np.sqrt(bc2) * denom)) / denom
                     + U32 * np.abs(update) + np.abs(update_mlx - update) + 2 * U32 * np.abs(p))
        if t in checkpoints:
            at[t] = (state.copy(), {
                "change": {n: float(np.linalg.norm(_key_bias_free(spec, n, a))) for n, a in dw.items()},
                "m": {n: float(np.linalg.norm(a)) for n, a in dm.items()},
                "v": {n: float(np.linalg.norm(a)) for n, a in dv.items()}})
    result.state = state
    return result, at


def trajectory_ratios(spec, train_spec, w0, ref, ref_at, got, got_at) -> dict[str, tuple[float, float, str]]:
    """quantity -> (worst error / bound, that error, where): <= 1 passes. Loss and grad norm at every
    step; weight change, m and v after each checkpoint step."""
    u = U16 if train_spec.precision == "mixed_bfloat16" else U32
    out = {}
    for q, values, refs, in_u in (("loss", got.losses, ref.losses, LOSS_BUDGET),
                                   ("grad_norm", got.grad_norms, ref.grad_norms, NORM_BUDGET)):
        bound = in_u[train_spec.precision] * u
        errs = [abs(g - r) / abs(r) for g, r in zip(values, refs)]
        k = int(np.argmax(errs))
        out[q] = (errs[k] / bound, errs[k], f"step {k + 1}")
    assert got.lrs == ref.lrs  # the pushed schedule: the same float64 numbers
    for k, (ref_state, budget) in ref_at.items():
        state = got_at[k]
        assert state.step == ref_state.step == k
        for q in ("change", "m", "v"):
            worst = (0.0, 0.0, "")
            for n, r in ref_state.params.items():
                if q == "change":
                    ref_d = _key_bias_free(spec, n, r - w0[n])
                    err = np.linalg.norm(_key_bias_free(spec, n, state.params[n] - w0[n]) - ref_d)
                else:
                    ref_d = getattr(ref_state, q)[n]
                    err = np.linalg.norm(getattr(state, q)[n] - ref_d)
                worst = max(worst, (err / budget[q][n], err / np.linalg.norm(ref_d), f"{n} after step {k}"))
            out[f"{q} (step {k})"] = worst
    return out


def run_case(name: str, seed: int, n_steps: int = STEPS, optimizer_hook=None):
    """MLX against the reference for CASES[name], checked after step 1 and step n_steps:
    trajectory_ratios' result. `optimizer_hook` alters MLX's optimizer (negative controls)."""
    spec, train_spec = CASES[name]
    checkpoints = sorted({1, n_steps})
    w0 = start_weights(spec, seed)
    batches, draws = make_batches(spec, train_spec, n_steps, seed)
    ref, ref_at = reference_with_budget(spec, train_spec, w0, batches, draws, checkpoints)
    model = MLX.build(spec, w0)
    optimizer = MLX.optimizer(model, train_spec)
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    got, got_at = TrainResult(), {}
    for it, micro_batches in enumerate(batches):
        stats = MLX.train_step(model, optimizer, train_spec, it, micro_batches, None if draws is None else draws[it])
        got.losses.append(stats.loss), got.grad_norms.append(stats.grad_norm), got.lrs.append(stats.lr)
        if it + 1 in checkpoints:
            got_at[it + 1] = MLX.optimizer_state(model, optimizer)
    return trajectory_ratios(spec, train_spec, w0, ref, ref_at, got, got_at)


# -- (a) against the float64 reference ------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_matches_the_float64_reference(name, seed):
    ratios = run_case(name, seed)
    over = {q: f"{err:.3g} at {where}: {r:.3g}x its bound" for q, (r, err, where) in ratios.items() if not r <= 1}
    assert not over, f"{name} seed {seed}: {over}"


def test_mlx_default_adamw_without_bias_correction_fails_the_reference_check():
    """The negative control: MLX's own default (bias_correction=False) makes the first update
    (1 - beta1) / sqrt(1 - beta2) = 0.447x torch's with betas (0.9, 0.95); the weight check must see it."""
    def mlx_default(optimizer):
        for group in optimizer.optimizers:
            group.bias_correction = False

    ratios = run_case("gpt2", 0, n_steps=1, optimizer_hook=mlx_default)
    assert ratios["change (step 1)"][0] > 100 and ratios["change (step 1)"][1] > 0.5, ratios
    assert ratios["m (step 1)"][0] <= 1  # the moments are the same: only the update's size differs


def test_optimizer_is_mlx_adamw_with_bias_correction_and_the_decay_split():
    import mlx.optimizers as optim

    spec, train_spec = CASES["gpt2"]
    model = MLX.build(spec, start_weights(spec, 0))
    optimizer = MLX.optimizer(model, train_spec)
    decayed, kept = optimizer.optimizers
    assert all(isinstance(o, optim.AdamW) and o.bias_correction for o in (decayed, kept))
    assert (decayed.weight_decay, kept.weight_decay) == (train_spec.weight_decay, 0.0)
    state = MLX.optimizer_state(model, optimizer)  # before any step: zero moments at step 0
    assert state.step == 0 and all(not a.any() for g in (state.m, state.v) for a in g.values())


# -- (b) determinism and (c) resume -----------------------------------------------------------------
def _run(spec, train_spec, w0, batches, draws, state=None):
    model = MLX.build(spec, w0 if state is None else state.params)
    return MLX.train(model, train_spec, batches, draws, state=state)


def _bitwise(a, b) -> None:
    assert a.losses == b.losses and a.grad_norms == b.grad_norms and a.lrs == b.lrs
    assert a.state.step == b.state.step
    for group in ("params", "m", "v"):
        for n, x in getattr(a.state, group).items():
            assert np.array_equal(x, getattr(b.state, group)[n]), f"{group}/{n} differs"


@pytest.mark.parametrize("name", ["gpt2", "ngpt", "mixed_bfloat16"])
def test_two_identical_runs_are_bitwise_identical(name):
    spec, train_spec = CASES[name]
    w0 = start_weights(spec, 0)
    batches, draws = make_batches(spec, train_spec, 4, 0)
    _bitwise(_run(spec, train_spec, w0, batches, draws), _run(spec, train_spec, w0, batches, draws))


@pytest.mark.parametrize("name", ["gpt2", "ngpt", "early_exit", "mixed_bfloat16"])
def test_resume_from_the_optimizer_state_is_bitwise(name):
    """N steps == N/2 steps, optimizer_state, a model rebuilt from state.params, optimizer(.., state), N/2 more."""
    spec, train_spec = CASES[name]
    w0 = start_weights(spec, 0)
    batches, draws = make_batches(spec, train_spec, STEPS, 0)
    half = STEPS // 2
    whole = _run(spec, train_spec, w0, batches, draws)
    first = _run(spec, train_spec, w0, batches[:half], None if draws is None else draws[:half])
    second = _run(spec, train_spec, None, batches[half:], None if draws is None else draws[half:], state=first.state)
    _bitwise(whole, type(whole)(first.losses + second.losses, first.grad_norms + second.grad_norms,
                                first.lrs + second.lrs, second.state))


# -- (d) bad input ------------------------------------------------------------------------------------------
def test_optimizer_state_with_a_wrong_name_is_refused_naming_it():
    spec, train_spec = CASES["gpt2"]
    w0 = start_weights(spec, 0)
    state = TrainState.initial(spec, w0)
    state.m["h.0.attn.c_atn.weight"] = state.m.pop("h.0.attn.c_attn.weight")
    with pytest.raises(WeightsError, match=r"c_atn\.weight(.|\n)*c_attn\.weight|c_attn\.weight(.|\n)*c_atn\.weight"):
        MLX.optimizer(MLX.build(spec, w0), train_spec, state)


def test_optimizer_state_with_a_wrong_shape_is_refused_naming_it():
    spec, train_spec = CASES["gpt2"]
    w0 = start_weights(spec, 0)
    state = TrainState.initial(spec, w0)
    state.v["ln_f.weight"] = np.zeros(3)
    with pytest.raises(WeightsError, match=r"ln_f\.weight"):
        MLX.optimizer(MLX.build(spec, w0), train_spec, state)


def test_a_nan_weight_stops_training_naming_the_step_and_tensor_like_the_reference():
    from mlx.utils import tree_unflatten
    import mlx.core as mx

    spec, train_spec = CASES["learned_sinks"]
    w0 = start_weights(spec, 0)
    batches, _ = make_batches(spec, train_spec, 2, 0)
    bad = ("h.0.mlp.c_fc.weight", (0, 0))
    model = MLX.build(spec, w0)
    optimizer = MLX.optimizer(model, train_spec)
    MLX.train_step(model, optimizer, train_spec, 0, batches[0])  # a healthy step first: it=1 diverges
    poisoned = MLX.state(model)
    poisoned[bad[0]][bad[1]] = np.nan
    model.update(tree_unflatten([(bad[0], mx.array(poisoned[bad[0]]))]))
    before = MLX.optimizer_state(model, optimizer)
    with pytest.raises(TrainingDiverged) as raised:
        MLX.train_step(model, optimizer, train_spec, 1, batches[1])
    ref_state = train(spec, train_spec, w0, batches[:1]).state
    ref_state.params[bad[0]][bad[1]] = np.nan
    with pytest.raises(TrainingDiverged) as expected:  # the reference names the first non-finite gradient
        train(spec, train_spec, ref_state, batches[1:])
    assert expected.value.step == 1 and expected.value.tensor is not None
    assert (raised.value.step, raised.value.tensor) == (expected.value.step, expected.value.tensor)
    assert "it=1" in str(raised.value) and repr(expected.value.tensor) in str(raised.value)
    after = MLX.optimizer_state(model, optimizer)  # nothing was applied: weights, moments, step
    assert after.step == before.step == 1
    for group in ("params", "m", "v"):
        for n, a in getattr(before, group).items():
            assert np.array_equal(getattr(after, group)[n], a, equal_nan=True), f"{group}/{n} changed"


def test_parameter_order_is_the_canonical_table():
    spec, train_spec = CASES["learned_sinks"]
    model = MLX.build(spec, start_weights(spec, 0))
    state = MLX.optimizer_state(model, MLX.optimizer(model, train_spec))
    assert list(state.m) == [p.name for p in param_table(spec)]


def test_global_norm_is_accurate_on_gpt2_token_embedding_shapes():
    """MLX's one-reduction sum (optim.clip_grad_norm's) adds one term at a time on the CPU: 9.6% low
    over 50257 x 768 squares. train.global_norm sums in two levels of ~sqrt(n) terms, so its worst
    case is 2 sqrt(n) u relative (each level a running sum of sqrt(n) positive terms)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from gptspec.backends.mlx.train import global_norm

    rng = np.random.default_rng(0)
    g = rng.standard_normal((50257, 768), dtype=np.float32) * np.float32(1e-3)
    wide = g.reshape(-1).astype(np.float64)
    exact = float(np.sqrt(np.dot(wide, wide)))
    bound = 2 * np.sqrt(g.size) * U32
    assert abs(global_norm({"wte": mx.array(g)}).item() / exact - 1) <= bound
    _, mlx_norm = optim.clip_grad_norm({"wte": mx.array(g)}, 1.0)
    assert abs(mlx_norm.item() / exact - 1) > 10 * bound  # why train.py does not use it
