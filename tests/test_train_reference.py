"""The training step of SPEC.md section 20: TrainSpec, the schedule and the float64 reference loop.

The reference's AdamW, clipping and pushed schedule are checked against torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ in float64 (the external oracle), fed the reference's gradients;
accumulation against the spec's definition computed from single loss_and_grads calls; nGPT's
post-step normalization against torch's vector norms; resume bitwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from gptspec.spec import IGNORE_INDEX, TRAIN_PRESETS, ModelSpec, SpecError, TrainingDiverged, TrainSpec, lr_at
from gptspec.spec import reference
from gptspec.spec.errors import InputError, WeightsError
from gptspec.spec.params import param_table
from gptspec.spec.reference import TrainState, load_state, save_state, train
from gptspec.spec.train import decay_split
from gptspec.weights import round_to_dtype, synthetic_params

TINY = ModelSpec.preset("test-tiny")
TINY_NGPT = TINY.replace(architecture="ngpt", positions="rope", mlp="swiglu")
# Clipping on, decay on, a warmup, the cosine, and steps past max_steps: every branch of the step.
RECIPE = TrainSpec(lr=1e-2, min_lr_ratio=0.1, warmup_steps=2, max_steps=5, schedule="cosine",
                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=0.7, grad_accum=2)


def make_batches(spec, n_steps, accum, B=2, T=8, seed=0):
    rng = np.random.default_rng(seed)
    V = spec.vocab_size
    return [[(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(accum)]
            for _ in range(n_steps)]


# -- TrainSpec ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [None, *TRAIN_PRESETS])
def test_trainspec_json_round_trip(name):
    ts = TrainSpec() if name is None else TrainSpec.preset(name)
    back = TrainSpec.from_json(ts.to_json())
    assert back == ts and hash(back) == hash(ts)
    assert isinstance(back.betas, tuple)


def test_presets_hold_the_published_numbers():
    b = TrainSpec.preset("build-nanogpt-gpt2")
    assert (b.lr, b.betas, b.weight_decay, b.grad_clip, b.warmup_steps, b.max_steps) == (
        6e-4, (0.9, 0.95), 0.1, 1.0, 715, 19073)
    assert b.min_lr == 6e-4 * 0.1  # build-nanogpt: min_lr = max_lr * 0.1
    n = TrainSpec.preset("ngpt")
    assert n.weight_decay == 0.0 and n.decay == "none" and n.warmup_steps == 0
    assert decay_split(TINY_NGPT, n)[0] == ()


def test_decay_rule_is_ndim_at_least_two():
    decayed, kept = decay_split(TINY, RECIPE)
    table = {p.name: p.shape for p in param_table(TINY)}
    assert set(decayed) == {n for n, s in table.items() if len(s) >= 2}
    assert set(kept) == {n for n, s in table.items() if len(s) < 2}
    assert "wte.weight" in decayed and "h.0.ln_1.weight" in kept and "h.0.attn.c_attn.bias" in kept


@pytest.mark.parametrize("changes, field, value", [
    (dict(lr=-1e-3), "lr", "-0.001"),
    (dict(lr=float("nan")), "lr", "nan"),
    (dict(lr=float("inf")), "lr", "inf"),
    (dict(betas=(1.0, 0.95)), "beta1", "1.0"),
    (dict(betas=(0.9, -0.1)), "beta2", "-0.1"),
    (dict(betas=(0.9, float("nan"))), "beta2", "nan"),
    (dict(betas=(0.9,)), "betas", "(0.9,)"),
    (dict(eps=0.0), "eps", "0.0"),
    (dict(eps=-1e-8), "eps", "-1e-08"),
    (dict(weight_decay=-0.1), "weight_decay", "-0.1"),
    (dict(warmup_steps=800, max_steps=500), "warmup_steps=800", "max_steps=500"),
    (dict(warmup_steps=-1), "warmup_steps", "-1"),
    (dict(max_steps=0), "max_steps", "0"),
    (dict(grad_clip=0.0), "grad_clip", "0.0"),
    (dict(grad_clip=-1.0), "grad_clip", "-1.0"),
    (dict(grad_accum=0), "grad_accum", "0"),
    (dict(grad_accum=2.0), "grad_accum", "2.0"),
    (dict(schedule="linear"), "schedule", "'linear'"),
    (dict(decay="all"), "decay", "'all'"),
    (dict(precision="float16"), "precision", "'float16'"),
    (dict(seed=-3), "seed", "-3"),
    (dict(schedule="cosine"), "max_steps", "cosine"),
    (dict(min_lr_ratio=0.0), "min_lr_ratio=0.0", "constant"),
    (dict(min_lr_ratio=1.5, schedule="cosine", max_steps=10), "min_lr_ratio", "1.5"),
    (dict(decay="none"), "weight_decay=0.01", "decay='none'"),
])
def test_bad_trainspec_names_field_and_value(changes, field, value):
    with pytest.raises(SpecError) as e:
        TrainSpec(**changes)
    assert field in str(e.value) and value in str(e.value), str(e.value)


def test_unknown_names_are_errors():
    with pytest.raises(SpecError, match="unknown TrainSpec preset 'gpt3'"):
        TrainSpec.preset("gpt3")
    with pytest.raises(SpecError, match=r"unknown TrainSpec field\(s\) \['momentum'\]"):
        TrainSpec.from_dict({"momentum": 0.9})
    with pytest.raises(SpecError, match="does not parse"):
        TrainSpec.from_json("{lr: 1}")


# -- the schedule ------------------------------------------------------------------------
def build_nanogpt_get_lr(it, max_lr=6e-4, min_lr=6e-4 * 0.1, warmup_steps=715, max_steps=19073):
    """build-nanogpt train_gpt2.py's get_lr, as published (the formula the spec adopts)."""
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


def test_schedule_boundaries_closed_form():
    ts = TrainSpec.preset("build-nanogpt-gpt2")
    lr, lo, w, n = 6e-4, 6e-5, 715, 19073
    assert lr_at(ts, 0) == pytest.approx(lr / w, rel=1e-15)
    assert lr_at(ts, w - 1) == pytest.approx(lr, rel=1e-15)
    assert lr_at(ts, w) == pytest.approx(lr, rel=1e-15)
    last = lo + 0.5 * (1 + math.cos(math.pi * (n - 1 - w) / (n - w))) * (lr - lo)
    assert lr_at(ts, n - 1) == pytest.approx(last, rel=1e-15)
    assert lr_at(ts, n - 1) > lo
    assert lr_at(ts, n) == pytest.approx(lo, rel=1e-15)
    assert lr_at(ts, n + 1) == lr_at(ts, 10 * n) == ts.min_lr
    mid = (w + n) / 2
    assert lr_at(ts, int(mid)) == pytest.approx(lo + 0.5 * (1 + math.cos(math.pi * (int(mid) - w) / (n - w))) * (lr - lo))


def test_schedule_is_build_nanogpt_bit_for_bit():
    ts = TrainSpec.preset("build-nanogpt-gpt2")
    for it in [*range(0, 730), *range(19060, 19090), 5000, 12345]:
        assert lr_at(ts, it) == build_nanogpt_get_lr(it), it


def test_constant_schedule_and_warmup():
    ts = TrainSpec(lr=3e-4, warmup_steps=4)
    assert [lr_at(ts, i) for i in range(6)] == [3e-4 * 1 / 4, 3e-4 * 2 / 4, 3e-4 * 3 / 4, 3e-4, 3e-4, 3e-4]
    assert lr_at(TrainSpec(lr=3e-4), 0) == 3e-4
    ngpt = TrainSpec.preset("ngpt")  # no warmup: the first update runs at the full lr
    assert lr_at(ngpt, 0) == 15e-4 and lr_at(ngpt, ngpt.max_steps) == 0.0
    with pytest.raises(SpecError, match="step must be an int >= 0, got -1"):
        lr_at(ts, -1)


# -- AdamW, clipping and the pushed schedule against torch ----------------------------------
def torch_oracle(spec, ts, params, batches):
    """torch.optim.AdamW with two parameter groups, clip_grad_norm_ and the schedule pushed into the
    groups every step, in float64, on the reference's gradients (each micro-batch's divided by n)."""
    torch = pytest.importorskip("torch")
    names = [p.name for p in param_table(spec)]
    tp = {n: torch.nn.Parameter(torch.tensor(np.asarray(params[n], np.float64))) for n in names}
    decayed, kept = decay_split(spec, ts)
    opt = torch.optim.AdamW([{"params": [tp[n] for n in decayed], "weight_decay": ts.weight_decay},
                             {"params": [tp[n] for n in kept], "weight_decay": 0.0}],
                            lr=ts.lr, betas=ts.betas, eps=ts.eps, foreach=False)
    norms = []
    for it, micro_batches in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(ts, it)
        opt.zero_grad(set_to_none=True)
        for tokens, targets in micro_batches:
            current = {n: tp[n].detach().numpy() for n in names}
            if ts.precision == "mixed_bfloat16":
                current = {n: round_to_dtype(a, "bfloat16").astype(np.float64) for n, a in current.items()}
            grads = reference.loss_and_grads(spec, current, tokens, targets).grads
            for n in names:
                g = torch.from_numpy(grads[n] / ts.grad_accum)
                tp[n].grad = g if tp[n].grad is None else tp[n].grad + g
        max_norm = ts.grad_clip if ts.grad_clip is not None else math.inf
        norms.append(float(torch.nn.utils.clip_grad_norm_([tp[n] for n in names], max_norm)))
        opt.step()
        if spec.architecture == "ngpt":
            with torch.no_grad():
                for info in param_table(spec):
                    if info.unit_norm_axis is not None:
                        w = tp[info.name]
                        w.div_(torch.linalg.vector_norm(w, dim=info.unit_norm_axis, keepdim=True))
    state = {n: opt.state[tp[n]] for n in names}
    return ({n: tp[n].detach().numpy() for n in names}, {n: state[n]["exp_avg"].numpy() for n in names},
            {n: state[n]["exp_avg_sq"].numpy() for n in names}, int(state[names[0]]["step"]), norms)


def _rel(a, b):
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a - b).max())


NGPT_RECIPE = TrainSpec.preset("ngpt").replace(lr=1e-2, max_steps=5, grad_accum=2, grad_clip=0.3)
ORACLE_CASES = {
    "gpt2-cosine-clip-accum": (TINY, RECIPE),
    "gpt2-llmc-test": (TINY, TrainSpec.preset("llmc-test")),
    "gpt2-mixed-bfloat16": (TINY, RECIPE.replace(precision="mixed_bfloat16")),
    "ngpt": (TINY_NGPT, NGPT_RECIPE.replace(precision="float32")),
    "ngpt-mixed-bfloat16": (TINY_NGPT, NGPT_RECIPE),
}


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_adamw_matches_torch(case):
    spec, ts = ORACLE_CASES[case]
    params = synthetic_params(spec, 1)
    batches = make_batches(spec, 7, ts.grad_accum, seed=2)
    result = train(spec, ts, params, batches)
    weights, m, v, step, norms = torch_oracle(spec, ts, params, batches)
    assert result.state.step == step == 7
    assert result.lrs == [lr_at(ts, i) for i in range(7)]
    np.testing.assert_allclose(result.grad_norms, norms, rtol=1e-12)
    worst = max(_rel(getattr(result.state, group)[n], ref[n])
                for group, ref in (("params", weights), ("m", m), ("v", v)) for n in weights)
    assert worst <= 1e-12, f"{case}: worst relative deviation from torch.optim.AdamW {worst:.3g}"
    # the weights moved by far more than the agreement, so the comparison means something
    moved = min(_rel(result.params[n], np.asarray(params[n], np.float64)) for n in weights)
    assert moved > 1e-6
    if ts.grad_clip is not None:
        assert any(x > ts.grad_clip for x in norms) and any(x < ts.grad_clip for x in norms), norms


def test_the_first_update_is_lr_times_sign_of_the_gradient():
    """Bias correction at t = 1: m_hat = g, v_hat = g^2, so each element moves by lr * g / (|g| + eps)."""
    ts = TrainSpec(lr=1e-3, weight_decay=0.0)
    params = synthetic_params(TINY, 3)
    batches = make_batches(TINY, 1, 1, seed=3)
    g = reference.loss_and_grads(TINY, params, *batches[0][0]).grads
    out = train(TINY, ts, params, batches).params
    for n, grad in g.items():
        expected = np.asarray(params[n], np.float64) - 1e-3 * grad / (np.abs(grad) + 1e-8)
        np.testing.assert_allclose(out[n], expected, rtol=1e-13, atol=1e-18, err_msg=n)


# -- accumulation ----------------------------------------------------------------------------
def test_accumulation_equals_one_batch_when_counts_are_equal():
    ts2 = TrainSpec(lr=1e-2, grad_accum=2, grad_clip=0.5)
    micro = make_batches(TINY, 3, 2, B=2, seed=4)
    whole = [[(np.concatenate([t for t, _ in mb]), np.concatenate([y for _, y in mb]))] for mb in micro]
    params = synthetic_params(TINY, 4)
    a = train(TINY, ts2, params, micro)
    b = train(TINY, ts2.replace(grad_accum=1), params, whole)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-13)
    np.testing.assert_allclose(a.grad_norms, b.grad_norms, rtol=1e-12)
    # per tensor, relative to its largest element: the attention k-bias has an exactly-zero gradient in
    # exact arithmetic, so its elements are rounding noise (1e-15) that differs between two orders of sums
    worst = max(_rel(a.params[n], b.params[n]) for n in a.params)
    assert worst < 1e-12, worst


def test_accumulation_is_the_mean_of_micro_batch_means():
    """A micro-batch with fewer counted targets weighs the same as the others (SPEC.md 20.4)."""
    (tok0, tgt0), (tok1, tgt1) = make_batches(TINY, 1, 2, B=2, seed=5)[0]
    tgt1 = tgt1.copy()
    tgt1[:, 2:] = IGNORE_INDEX  # 4 counted targets against 16 in micro-batch 0
    params = synthetic_params(TINY, 5)
    r0 = reference.loss_and_grads(TINY, params, tok0, tgt0)
    r1 = reference.loss_and_grads(TINY, params, tok1, tgt1)
    ts = TrainSpec(lr=1e-2, grad_accum=2)
    step = train(TINY, ts, params, [[(tok0, tgt0), (tok1, tgt1)]])
    assert step.losses[0] == pytest.approx((r0.loss + r1.loss) / 2, rel=1e-14)
    mean_grads = {n: (r0.grads[n] + r1.grads[n]) / 2 for n in r0.grads}
    norm = math.sqrt(sum(float((g * g).sum()) for g in mean_grads.values()))
    assert step.grad_norms[0] == pytest.approx(norm, rel=1e-12)
    whole = reference.loss_and_grads(TINY, params, np.concatenate([tok0, tok1]), np.concatenate([tgt0, tgt1]))
    assert abs(step.losses[0] - whole.loss) > 1e-3  # the token-weighted mean is a different number
    assert whole.loss == pytest.approx((16 * r0.loss + 4 * r1.loss) / 20, rel=1e-13)


def test_early_exit_draws_are_inputs_per_micro_batch():
    spec = TINY.replace(loss="early_exit")
    batches = make_batches(spec, 2, 2, seed=6)
    rng = np.random.default_rng(7)
    draws = [[rng.random((spec.n_layer, 2, 8)) ** 4 for _ in range(2)] for _ in range(2)]
    params = synthetic_params(spec, 6)
    out = train(spec, TrainSpec(lr=1e-2, grad_accum=2), params, batches, draws)
    first = [reference.loss_and_grads(spec, params, t, y, u).loss for (t, y), u in zip(batches[0], draws[0])]
    assert out.losses[0] == pytest.approx(sum(first) / 2, rel=1e-14)
    with pytest.raises(InputError, match="early_exit"):
        train(spec, TrainSpec(lr=1e-2, grad_accum=2), params, batches)


# -- nGPT ------------------------------------------------------------------------------------
def test_ngpt_step_keeps_unit_norms():
    ts = TrainSpec.preset("ngpt").replace(lr=5e-2, max_steps=4, grad_accum=1)
    params = synthetic_params(TINY_NGPT, 8)
    out = train(TINY_NGPT, ts, params, make_batches(TINY_NGPT, 4, 1, seed=8))
    for info in param_table(TINY_NGPT):
        w = out.params[info.name]
        if info.unit_norm_axis is not None:
            np.testing.assert_allclose(np.linalg.norm(w, axis=info.unit_norm_axis), 1.0, rtol=1e-14)
        assert _rel(w, np.asarray(params[info.name], np.float64)) > 1e-4, info.name
    # the scaling vectors are trained, not normalized
    assert not np.allclose(np.linalg.norm(out.params["sz"]), 1.0)


# -- resume, state files, bad state ----------------------------------------------------------
def test_resume_is_bitwise(tmp_path):
    params = synthetic_params(TINY, 9)
    batches = make_batches(TINY, 6, 2, seed=9)
    full = train(TINY, RECIPE, params, batches)
    half = train(TINY, RECIPE, params, batches[:3])
    save_state(tmp_path / "state.safetensors", TINY, RECIPE, half.state)
    spec, ts, state = load_state(tmp_path / "state.safetensors", TINY)
    assert spec == TINY and ts == RECIPE and state.step == 3
    rest = train(TINY, ts, state, batches[3:])
    assert half.losses + rest.losses == full.losses
    assert half.grad_norms + rest.grad_norms == full.grad_norms
    assert half.lrs + rest.lrs == full.lrs
    for group in ("params", "m", "v"):
        for n, a in getattr(full.state, group).items():
            assert np.array_equal(getattr(rest.state, group)[n], a), (group, n)
    again = train(TINY, RECIPE, params, batches)  # and two identical runs are identical
    assert again.losses == full.losses
    assert all(np.array_equal(again.params[n], a) for n, a in full.params.items())


def test_bad_state_is_named(tmp_path):
    good = TrainState.initial(TINY, synthetic_params(TINY, 0))
    bad = good.copy()
    bad.m["wte.weight"] = bad.m["wte.weight"][:3]
    with pytest.raises(WeightsError, match=r"first moments.*wte.weight: expected \(61, 8\), got \(3, 8\)"):
        train(TINY, RECIPE, bad, make_batches(TINY, 1, 2))
    bad = good.copy()
    bad.v["h.0.mlp.c_fc.wieght"] = bad.v.pop("h.0.mlp.c_fc.weight")
    with pytest.raises(WeightsError, match="second moments.*missing 1 tensor.*h.0.mlp.c_fc.weight"):
        train(TINY, RECIPE, bad, make_batches(TINY, 1, 2))
    with pytest.raises(WeightsError, match="step must be an int >= 0, got -1"):
        train(TINY, RECIPE, TrainState(-1, good.params, good.m, good.v), make_batches(TINY, 1, 2))
    with pytest.raises(InputError, match="step 0 has 1 micro-batch.*grad_accum=2"):
        train(TINY, RECIPE, good, make_batches(TINY, 1, 1))
    with pytest.raises(WeightsError, match="state is of model"):
        save_state(tmp_path / "s.safetensors", TINY, RECIPE, good)
        load_state(tmp_path / "s.safetensors", TINY.replace(n_layer=2))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the Inf is the point of the test
def test_divergence_names_the_step_and_the_tensor(tmp_path):
    params = dict(synthetic_params(TINY, 0))
    batches = make_batches(TINY, 2, 2, seed=10)
    first = train(TINY, RECIPE, params, batches[:1])
    first.state.params["h.0.mlp.c_fc.weight"][0, 0] = np.inf
    # the Inf reaches every gradient through the logits: wte.weight is the first in canonical order
    with pytest.raises(TrainingDiverged, match=r"it=1: the gradient \(micro-batch 0, loss nan\) of 'wte.weight'") as e:
        train(TINY, RECIPE, first.state, batches[1:])
    assert e.value.step == 1 and e.value.tensor == "wte.weight"
    path = tmp_path / "never.safetensors"
    with pytest.raises(WeightsError, match="params/h.0.mlp.c_fc.weight holds NaN or Inf"):
        save_state(path, TINY, RECIPE, first.state)
    assert not path.exists() and not list(tmp_path.iterdir())
