"""tinygrad training (SPEC.md section 20) against the float64 reference, and its determinism and resume.

From the same float32 weights and batches, the tinygrad backend's per-step loss, grad norm and lr, and
after 1 and N steps its weights, m and v, are compared with spec.reference.train (float64). Weights
are compared through their change w_k - w_0 per tensor: after a few steps the weights have moved by
~k*lr, a small part of their size, and ||w - w_ref|| / ||w|| would hide a wrong step.

The local bounds are float32 roundoff times a conditioning derived from the reference run itself
(`reference_with_budget`, as tests/test_mlx_training.py derives MLX's): per element, a gradient error
of C_GRAD * u * t * max|gradient of the tensor| carried through the moments and Adam's division (where
a gradient is ~0, Adam turns its rounding into a move of ~lr: the budget grows there as
1 / (sqrt(v_hat) + eps)); each update and each stored weight rounds to float32; tinygrad's float32 bias
corrections and float32 lr (backends/tinygrad/train.py) add their exactly computed deviation. C_GRAD,
the float32 conditioning of a micro-batch gradient in these models, is the one measured constant (worst
||dm|| / ||m|| after one step over the cases and seeds 0-2, in u, rounded up to a power of 2). The loss
and grad norm have fixed budgets in u. mixed_bfloat16 puts bfloat16's u = 2^-8 in the gradient term.

tinygrad compiles each new graph slowly on a small CPU (tens of seconds): the cases are test-tiny,
STEPS steps, and the tests reuse the same shapes so that one pytest run compiles each graph once;
the early-exit case (a graph of its own) runs in --tier heavy. mixed_bfloat16 comes last (see there).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tinygrad")

from tinygrad import nn  # noqa: E402

from gptspec.backends.tinygrad import BACKEND as TG  # noqa: E402
from gptspec.backends.tinygrad.train import configure_optimizer, float32_power  # noqa: E402
from gptspec.backends.tinygrad.train import train_step as tinygrad_train_step  # noqa: E402
from gptspec.spec import BackendError, ModelSpec, TrainingDiverged, TrainSpec, param_table  # noqa: E402
from gptspec.spec.errors import WeightsError  # noqa: E402
from gptspec.spec.reference import TrainResult, TrainState, train  # noqa: E402
from gptspec.spec.reference.training import train_step as reference_step  # noqa: E402
from gptspec.weights import round_to_dtype, synthetic_params  # noqa: E402

WHY = TG.unavailable_reason()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"tinygrad cannot run here: {WHY}")

TINY = ModelSpec.preset("test-tiny")
U32, U16 = 2.0 ** -24, 2.0 ** -8
# Measured over CASES x seeds 0-2, 3 steps (worst, in the compute dtype's u):
#   ||dm|| / ||m|| after one step: 29 (float32, ngpt seed 1), 3.1 (mixed_bfloat16)  -> C_GRAD
#   loss: 5.8 (float32, gpt2-betas-0.999 step 3), 0.09 (mixed_bfloat16)             -> LOSS_BUDGET
#   grad norm: 15 (float32, gpt2-betas-0.999 step 3), 0.35 (mixed_bfloat16)         -> NORM_BUDGET
# worst ratio to these bounds: 0.36x (loss), 0.33x (v after one step, bf16), 0.29x (the weight change,
# gpt2-betas-0.999, where tinygrad's float32 bias correction shows)
C_GRAD = {"float32": 64, "mixed_bfloat16": 8}
LOSS_BUDGET = {"float32": 16, "mixed_bfloat16": 1}
NORM_BUDGET = {"float32": 64, "mixed_bfloat16": 4}

# Clipping (hit: norms of ~1-3 against 0.7), decay, a warmup, the cosine, accumulation.
RECIPE = TrainSpec(lr=1e-2, min_lr_ratio=0.1, warmup_steps=2, max_steps=5, schedule="cosine",
                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=0.7, grad_accum=2)
STEPS = 3

CASES = {
    "gpt2": (TINY, RECIPE),
    # torch's default betas (0.9, 0.999): where tinygrad's float32 bias correction shows most (train.py)
    "gpt2-betas-0.999": (TINY, TrainSpec(lr=1e-2, weight_decay=0.1, grad_accum=2)),
    "ngpt": (TINY.replace(architecture="ngpt", positions="rope", mlp="swiglu"),
             TrainSpec.preset("ngpt").replace(lr=1e-2, max_steps=5, grad_accum=2, precision="float32")),
    "mixed_bfloat16": (TINY, RECIPE.replace(precision="mixed_bfloat16")),
    # the early-exit draws, an input of every micro-batch (SPEC.md 18.3)
    "early_exit": (TINY.replace(n_layer=2, loss="early_exit"), RECIPE),
}
# a graph of their own (~45 s of tinygrad compiling on a 2-core CPU): --tier heavy
HEAVY_CASES = ("early_exit",)


def start_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """The reference and tinygrad start from the same float32 weights."""
    return {n: round_to_dtype(a, "float32").astype(np.float32)
            for n, a in synthetic_params(spec, seed, "conformance").items()}


def make_batches(spec: ModelSpec, train_spec: TrainSpec, n_steps: int, seed: int, B=2, T=8):
    """(batches, draws): draws None unless loss="early_exit"."""
    rng = np.random.default_rng(1000 + seed)
    V, n = spec.vocab_size, train_spec.grad_accum
    batches = [[(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)] for _ in range(n_steps)]
    draws = None
    if spec.loss == "early_exit":
        draws = [[rng.random((spec.n_layer, B, T)) for _ in range(n)] for _ in range(n_steps)]
    return batches, draws


def _key_bias_free(spec: ModelSpec, name: str, a: np.ndarray) -> np.ndarray:
    """The attention key bias has an exact gradient of zero (a constant added to a query's every logit):
    its moves are rounding noise amplified by Adam to ~lr in any implementation, so the weight-change
    metric leaves that slice out (its m and v, ~0, stay in the moment checks)."""
    if spec.architecture == "gpt2" and name.endswith("attn.c_attn.bias") and spec.attention_values == "projected":
        C = spec.n_embd
        return np.concatenate([a[:C], a[2 * C:]])
    return a


def _f32(x: float) -> float:
    return float(np.float32(x))


def reference_with_budget(spec, train_spec, w0, batches, draws):
    """spec.reference.train step by step, with the float32 run's error budget (module docstring) after
    each step: (result, [state after step k], [{"change"|"m"|"v": {name: the budget's norm}} per step])."""
    b1, b2 = train_spec.betas
    eps = train_spec.eps
    u_grad = (U16 if train_spec.precision == "mixed_bfloat16" else U32) * C_GRAD[train_spec.precision]
    state, result, states, budgets = TrainState.initial(spec, w0), TrainResult(), [], []
    dm, dv, dw = ({n: np.zeros_like(a) for n, a in state.params.items()} for _ in range(3))
    for i, micro_batches in enumerate(batches):
        m_before = {n: a.copy() for n, a in state.m.items()}
        loss, norm, lr = reference_step(spec, train_spec, state, micro_batches, None if draws is None else draws[i])
        result.losses.append(loss), result.grad_norms.append(norm), result.lrs.append(lr)
        t = state.step
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        # tinygrad's: running float32 products of float32 betas, 1 - them in float32, a float32 lr
        bc1_tg, bc2_tg = (float(np.float32(1) - float32_power(b, t)) for b in (b1, b2))
        for n, p in state.params.items():
            m, v = state.m[n], state.v[n]
            g = (m - b1 * m_before[n]) / (1 - b1)  # the step's clipped gradient
            dg = u_grad * t * np.abs(g).max()
            dm[n] = b1 * dm[n] + (1 - b1) * dg
            dv[n] = b2 * dv[n] + (1 - b2) * 2 * np.abs(g) * dg
            sqrt_v = np.sqrt(v)
            denom = sqrt_v / np.sqrt(bc2) + eps
            update = lr / bc1 * m / denom
            update_tg = _f32(lr) * (m / bc1_tg) / (np.sqrt(v / bc2_tg) + eps)
            d_sqrt_v = np.minimum(dv[n] / (2 * np.maximum(sqrt_v, 1e-300)), np.sqrt(dv[n]))
            dw[n] = (dw[n] + lr / bc1 * (dm[n] + np.abs(m) * d_sqrt_v / (np.sqrt(bc2) * denom)) / denom
                     + U32 * np.abs(update) + np.abs(update_tg - update) + 2 * U32 * np.abs(p))
        states.append(state.copy())
        budgets.append({"change": {n: float(np.linalg.norm(_key_bias_free(spec, n, a))) for n, a in dw.items()},
                        "m": {n: float(np.linalg.norm(a)) for n, a in dm.items()},
                        "v": {n: float(np.linalg.norm(a)) for n, a in dv.items()}})
    result.state = state
    return result, states, budgets


def state_ratios(spec, w0, ref_state, budget, got_state) -> dict[str, tuple[float, float, str]]:
    """"change"|"m"|"v" -> (worst error / bound, that relative error, the tensor): <= 1 passes."""
    out = {}
    for q in ("change", "m", "v"):
        worst = (0.0, 0.0, "")
        for n, r in ref_state.params.items():
            if q == "change":
                ref_d = _key_bias_free(spec, n, r - w0[n])
                err = np.linalg.norm(_key_bias_free(spec, n, got_state.params[n] - w0[n]) - ref_d)
            else:
                ref_d = getattr(ref_state, q)[n]
                err = np.linalg.norm(getattr(got_state, q)[n] - ref_d)
            worst = max(worst, (err / budget[q][n], err / np.linalg.norm(ref_d), n))
        out[q] = worst
    return out


def run_case(name: str, seed: int, n_steps: int = STEPS, optimizer_hook=None):
    """tinygrad against the reference for CASES[name]: {"<quantity> after step k": (ratio, error, where)}.
    `optimizer_hook` alters tinygrad's optimizer (a negative control)."""
    spec, train_spec = CASES[name]
    w0 = start_weights(spec, seed)
    batches, draws = make_batches(spec, train_spec, n_steps, seed)
    ref, ref_states, budgets = reference_with_budget(spec, train_spec, w0, batches, draws)
    model = TG.build(spec, w0)
    optimizer = TG.optimizer(model, train_spec)
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    u = U16 if train_spec.precision == "mixed_bfloat16" else U32
    out = {}
    for it, micro_batches in enumerate(batches):
        stats = TG.train_step(model, optimizer, train_spec, it, micro_batches, None if draws is None else draws[it])
        assert stats.lr == ref.lrs[it]  # the pushed schedule: the same float64 number
        for q, got, want, in_u in (("loss", stats.loss, ref.losses[it], LOSS_BUDGET),
                                   ("grad_norm", stats.grad_norm, ref.grad_norms[it], NORM_BUDGET)):
            err = abs(got - want) / abs(want)
            out[f"{q} at step {it + 1}"] = (err / (in_u[train_spec.precision] * u), err, "")
        if it in (0, n_steps - 1):
            state = TG.optimizer_state(model, optimizer)
            assert state.step == it + 1
            for q, r in state_ratios(spec, w0, ref_states[it], budgets[it], state).items():
                out[f"{q} after step {it + 1}"] = r
    return out


# -- (a) against the float64 reference ------------------------------------------------------------
def check_trajectory(name: str, seed: int) -> None:
    ratios = run_case(name, seed)
    over = {q: f"{err:.3g} {where}: {r:.3g}x its bound" for q, (r, err, where) in ratios.items() if not r <= 1}
    assert not over, f"{name} seed {seed}: {over}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", [n for n, (_, t) in CASES.items() if t.precision == "float32"])
def test_trajectory_matches_the_float64_reference(name, seed, tier):
    if name in HEAVY_CASES and tier != "heavy":
        pytest.skip(f"{name} compiles a graph of its own: --tier heavy")
    check_trajectory(name, seed)


def test_a_step_with_the_decay_on_every_tensor_fails_the_reference_check():
    """A negative control: decay on biases and gains too (one AdamW over everything, a common port
    mistake); the weight change of those tensors must break its bound while the moments hold."""
    def decay_everything(optimizer):
        for opt in optimizer.optimizers:
            opt.wd = RECIPE.weight_decay

    ratios = run_case("gpt2", 0, n_steps=1, optimizer_hook=decay_everything)
    assert ratios["change after step 1"][0] > 100, ratios
    assert ratios["m after step 1"][0] <= 1  # the moments are the same: only the update differs


def test_optimizer_is_tinygrad_adamw_with_the_decay_split():
    spec, train_spec = CASES["gpt2"]
    model = TG.build(spec, start_weights(spec, 0))
    optimizer = configure_optimizer(model, train_spec)
    assert isinstance(optimizer, nn.optim.OptimizerGroup)
    decayed, kept = optimizer.optimizers
    assert all(isinstance(o, nn.optim.LAMB) and o.adam and not o.fused for o in (decayed, kept))
    assert (decayed.wd, kept.wd) == (train_spec.weight_decay, 0.0)
    assert (decayed.b1, decayed.b2, decayed.eps) == (*train_spec.betas, train_spec.eps)
    state = TG.optimizer_state(model, optimizer)  # before any step: zero moments at step 0, canonical order
    assert state.step == 0 and all(not a.any() for g in (state.m, state.v) for a in g.values())
    assert list(state.m) == list(state.v) == [p.name for p in param_table(spec)]


def test_float32_power_is_the_optimizers_running_product():
    """load_moments restores b1_t, b2_t from this: it must equal what `b_t *= b` leaves in tinygrad."""
    spec, train_spec = CASES["gpt2"]
    model = TG.build(spec, start_weights(spec, 0))
    optimizer = configure_optimizer(model, train_spec)
    opt = optimizer.optimizers[0]
    for step in range(1, 4):
        opt.b1_t *= opt.b1
        opt.b2_t *= opt.b2
        assert opt.b1_t.numpy()[0] == float32_power(opt.b1, step)
        assert opt.b2_t.numpy()[0] == float32_power(opt.b2, step)


# -- (b) determinism and (c) resume -----------------------------------------------------------------
def _run(spec, train_spec, w0, batches, state=None):
    model = TG.build(spec, w0 if state is None else state.params)
    return TG.train(model, train_spec, batches, state=state)  # no early_exit case here: no draws


def _bitwise(a, b) -> None:
    assert a.losses == b.losses and a.grad_norms == b.grad_norms and a.lrs == b.lrs
    assert a.state.step == b.state.step
    for group in ("params", "m", "v"):
        for n, x in getattr(a.state, group).items():
            assert np.array_equal(x, getattr(b.state, group)[n]), f"{group}/{n} differs"


@pytest.mark.parametrize("name", ["gpt2", "ngpt"])
def test_two_identical_runs_are_bitwise_identical(name):
    spec, train_spec = CASES[name]
    w0 = start_weights(spec, 0)
    batches, _ = make_batches(spec, train_spec, STEPS, 0)
    _bitwise(_run(spec, train_spec, w0, batches), _run(spec, train_spec, w0, batches))


@pytest.mark.parametrize("name", ["gpt2", "ngpt"])
def test_resume_from_the_optimizer_state_is_bitwise(name):
    """N steps == N/2 steps, optimizer_state, a model rebuilt from state.params, optimizer(.., state), N/2 more."""
    spec, train_spec = CASES[name]
    w0 = start_weights(spec, 0)
    n = 4
    batches, _ = make_batches(spec, train_spec, n, 0)
    whole = _run(spec, train_spec, w0, batches)
    first = _run(spec, train_spec, w0, batches[:n // 2])
    second = _run(spec, train_spec, None, batches[n // 2:], state=first.state)
    _bitwise(whole, TrainResult(first.losses + second.losses, first.grad_norms + second.grad_norms,
                                first.lrs + second.lrs, second.state))


# -- (d) bad input ------------------------------------------------------------------------------------------
def test_optimizer_state_with_a_wrong_name_is_refused_naming_it():
    spec, train_spec = CASES["gpt2"]
    w0 = start_weights(spec, 0)
    state = TrainState.initial(spec, w0)
    state.m["h.0.attn.c_atn.weight"] = state.m.pop("h.0.attn.c_attn.weight")
    with pytest.raises(WeightsError, match=r"c_atn\.weight(.|\n)*c_attn\.weight|c_attn\.weight(.|\n)*c_atn\.weight"):
        TG.optimizer(TG.build(spec, w0), train_spec, state)


def test_optimizer_state_with_a_wrong_shape_is_refused_naming_it():
    spec, train_spec = CASES["gpt2"]
    w0 = start_weights(spec, 0)
    state = TrainState.initial(spec, w0)
    state.v["ln_f.weight"] = np.zeros(3)
    with pytest.raises(WeightsError, match=r"ln_f\.weight"):
        TG.optimizer(TG.build(spec, w0), train_spec, state)


def test_training_a_half_precision_model_is_refused_naming_the_master_weights():
    spec, train_spec = CASES["gpt2"]
    model = TG.build(spec, start_weights(spec, 0), "float16")
    with pytest.raises(BackendError, match=r"float32 master weights(.|\n)*wte\.weight(.|\n)*float16"):
        TG.optimizer(model, train_spec)


def test_a_nan_weight_stops_training_naming_the_step_and_tensor_like_the_reference():
    spec, train_spec = CASES["gpt2"]
    w0 = start_weights(spec, 0)
    batches, _ = make_batches(spec, train_spec, 2, 0)
    bad = ("h.0.mlp.c_fc.weight", (0, 0))
    model = TG.build(spec, w0)
    optimizer = TG.optimizer(model, train_spec)
    TG.train_step(model, optimizer, train_spec, 0, batches[0])  # a healthy step first: it=1 diverges
    weight = nn.state.get_state_dict(model)[bad[0]]
    poisoned = weight.numpy()
    poisoned[bad[1]] = np.nan
    weight.assign(type(weight)(poisoned, device=weight.device)).realize()
    before = TG.optimizer_state(model, optimizer)
    with pytest.raises(TrainingDiverged) as raised:
        tinygrad_train_step(model, optimizer, train_spec, 1, batches[1])  # the user's function itself
    ref_state = train(spec, train_spec, w0, batches[:1]).state
    ref_state.params[bad[0]][bad[1]] = np.nan
    with pytest.raises(TrainingDiverged) as expected:  # the reference names the first non-finite gradient
        train(spec, train_spec, ref_state, batches[1:])
    assert expected.value.step == 1 and expected.value.tensor is not None
    assert (raised.value.step, raised.value.tensor) == (expected.value.step, expected.value.tensor)
    assert "it=1" in str(raised.value) and repr(expected.value.tensor) in str(raised.value)
    after = TG.optimizer_state(model, optimizer)  # nothing was applied: weights, moments, step
    assert after.step == before.step == 1
    for group in ("params", "m", "v"):
        for n, a in getattr(before, group).items():
            assert np.array_equal(getattr(after, group)[n], a, equal_nan=True), f"{group}/{n} changed"


# -- mixed_bfloat16, last: its bfloat16 emulation (backend.py ensure_bfloat16) is process-wide on a CPU
# whose clang lacks __bf16, and changes the code of the kernels compiled after it ---------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_bfloat16_trajectory_matches_the_float64_reference(seed):
    check_trajectory("mixed_bfloat16", seed)


def test_mixed_bfloat16_resume_from_the_optimizer_state_is_bitwise():
    test_resume_from_the_optimizer_state_is_bitwise("mixed_bfloat16")
