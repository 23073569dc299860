"""Training in plain tinygrad (SPEC.md section 20): tinygrad's own AdamW, configured to the spec.

    optimizer = configure_optimizer(model, train_spec)          # nn.optim.OptimizerGroup of AdamWs
    for it, micro_batches in enumerate(batches):                # micro_batches: [(tokens, targets), ...]
        loss, grad_norm, lr = train_step(model, optimizer, train_spec, it, micro_batches)

tinygrad's nn.optim.AdamW is LAMB without the trust ratio. Per tensor, with g the (clipped) gradient:

    b1_t *= b1; b2_t *= b2                                       # float32 running products
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
    p -= lr * ((m/(1-b1_t)) / (sqrt(v/(1-b2_t)) + eps) + wd*p)

which is torch's AdamW algebraically (decoupled decay lr*wd*p on the old weight, bias-corrected
moments, eps added to the corrected sqrt(v)), not operation by operation: tinygrad forms the bias
corrections 1 - b^t in float32 from float32 running products, torch in Python double from b**t. With
b2 = 0.999, float32's 0.999 is off by 1.3e-8, a relative 1.3e-5 of 1 - b2 at t = 1, half of it
through the square root. Measured, fed the same gradients (64x64, weights 0, so that only the update
counts): tinygrad's update differs from the float64 torch formula by 6.6e-6 (relative norm) at step 1,
9.6e-6 at step 5, 8.3e-6 at step 20, where torch's own float32 AdamW differs by 1e-7; with betas
(0.9, 0.95) tinygrad is at float32 rounding (0.9e-7 .. 1.4e-7). The decay is folded into the update:
one rounding of the weight where torch has two. tests/test_training.py (test_one_update_fed_the_same_gradients_is_the_specs_adamw)
holds the measured deviation between 3e-6 and 1e-5; tests/test_trajectory.py bounds the runs.

The optimizer steps only under Context(TRAINING=1) (tinygrad 0.14 raises otherwise; older tinygrad
spelled it Tensor.train()), which train_step sets.
tinygrad keeps no step count, only b1_t and b2_t (which underflow to 0 after 10^3..10^5 steps), so
train_step counts the steps taken in `optimizer.steps_taken` for the optimizer's state (resume).

The step is eager, not one TinyJit as in tinygrad's beautiful_mnist: the update must wait for the
finiteness check of the loss and the gradient norm on the host (SPEC.md 20.10), which a jitted
step would apply before anyone could look, and a jit split around the check would hand its reused
output buffers across micro-batches. tinygrad still compiles each kernel once: the optimizer's
moments are realized buffers from the start and each micro-batch's gradient is realized before it
is added, so every step, micro-batch and resumed run runs the kernels compiled for the first. On
test-tiny (2-core CPU): the first step ~28 s (compiling), each later one ~1 s (scheduling).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping, Sequence

import numpy as np
from tinygrad import Context, Tensor, dtypes, nn

from ...spec import BackendError
from ...spec.train import CLIP_EPS, TrainSpec, decay_split, lr_at
from ..base import check_finite_step
from .model import LanguageModel


def configure_optimizer(model: LanguageModel, train_spec: TrainSpec) -> nn.optim.OptimizerGroup:
    """tinygrad's AdamW over the decayed tensors (weight_decay=wd) and another over the rest (0), as one
    OptimizerGroup. Unfused (FUSE_OPTIM off): one m and v per tensor, so the state has canonical names."""
    check_master_weights(model)
    state = nn.state.get_state_dict(model)
    b1, b2 = train_spec.betas
    lr = lr_at(train_spec, 0)
    groups = [nn.optim.AdamW([state[n] for n in names], lr=lr, b1=b1, b2=b2, eps=train_spec.eps,
                             weight_decay=wd, fused=False)
              for names, wd in zip(decay_split(model.spec, train_spec), (train_spec.weight_decay, 0.0)) if names]
    optimizer = nn.optim.OptimizerGroup(*groups)
    optimizer.steps_taken = 0
    # realized now, not lazy zeros and ones: the first step then runs the kernels of every later step
    # (and of a resumed run's first step), so they compile once and round alike
    Tensor.realize(*(t for o in groups for t in (o.lr, o.b1_t, o.b2_t, *o.m, *o.v)))
    return optimizer


def train_step(model: LanguageModel, optimizer: nn.optim.OptimizerGroup, train_spec: TrainSpec, it: int,
               micro_batches: Sequence[tuple], draws: Sequence | None = None) -> tuple[float, float, float]:
    """Iteration `it`: lr_at(it) into the optimizer, the mean gradient of the micro-batches (each loss / n,
    accumulated in each weight's .grad), the global norm and clipping, AdamW, nGPT's normalization.
    micro_batches: (tokens, targets) as numpy arrays or Tensors; draws: loss="early_exit"'s per micro-batch.
    Returns (loss, grad_norm before clipping, lr); a non-finite loss or gradient raises TrainingDiverged
    before the update."""
    check_master_weights(model)
    params = list(nn.state.get_state_dict(model).values())
    device = params[0].device
    lr = lr_at(train_spec, it)
    with Context(TRAINING=1):
        for opt in optimizer.optimizers:  # assigned, not replaced: the optimizer's kernels read this buffer
            opt.lr.assign(Tensor([lr], dtype=opt.lr.dtype, device=opt.lr.device)).realize()
        optimizer.zero_grad()
        n, loss_value = len(micro_batches), 0.0
        for k, (tokens, targets) in enumerate(micro_batches):
            u = None if draws is None else _tensor(draws[k], dtypes.float32, device)
            with compute_weights(model, train_spec.precision):
                micro_loss = model.loss_and_logits(_tensor(tokens, dtypes.int32, device),
                                                   _tensor(targets, dtypes.int32, device), u)[0].float() / n
            # Tensor.gradient of the weights only: backward() would also fill (and keep growing) a .grad on
            # every float Tensor the graph reads, such as nGPT's cached RoPE tables. Each micro-batch's
            # gradient is realized before it is added, as a training loop runs them: its graph is freed
            # before the next, and every micro-batch runs the kernels compiled for the first.
            grads = micro_loss.gradient(*params)
            Tensor.realize(micro_loss, *grads)
            loss_value += micro_loss.item()
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad + g
            Tensor.realize(*(p.grad for p in params))
        grads = [p.grad for p in params]
        norm = global_norm(grads)
        norm_value = norm.item()
        check_finite_step(it, loss_value, norm_value,
                          lambda: {name: g.numpy() for name, g in zip(nn.state.get_state_dict(model), grads)})
        if train_spec.grad_clip is not None:
            # torch's clip_grad_norm_: every gradient times min(1, max_norm / (norm + 1e-6)); times 1.0 is exact
            coef = (train_spec.grad_clip / (norm + CLIP_EPS)).minimum(1.0)
            for p in params:
                p.grad = p.grad * coef
        optimizer.step()
        optimizer.steps_taken += 1
    if model.spec.has_unit_norm_weights:
        model.normalize_()  # SPEC.md 11.3: part of the step
    return loss_value, norm_value, lr


def global_norm(grads: Sequence[Tensor]) -> Tensor:
    """torch's clip_grad_norm_: the L2 norm of the per-tensor L2 norms, in float32."""
    return Tensor.stack(*(g.float().square().sum().sqrt() for g in grads)).square().sum().sqrt()


def check_master_weights(model: LanguageModel) -> None:
    """Training updates float32 master weights (SPEC.md 20.9); mixed precision casts a copy per micro-batch."""
    odd = {n: t.dtype for n, t in nn.state.get_state_dict(model).items() if t.dtype != dtypes.float32}
    if odd:
        name, dtype = next(iter(odd.items()))
        raise BackendError(f"training needs float32 master weights, but {name} (and {len(odd) - 1} more) is "
                           f"{dtype}; build the model with dtype='float32' (precision='mixed_bfloat16' computes "
                           f"each micro-batch in bfloat16 from them)")


@contextmanager
def compute_weights(model: LanguageModel, precision: str):
    """precision="mixed_bfloat16" (SPEC.md 20.9): the model computes with a bfloat16 copy of its float32
    weights, as a model built in bfloat16 computes (SPEC.md 7); the cast is differentiable, so backward
    widens the bfloat16 gradients into the float32 weights' .grad. "float32": the weights themselves.
    Under tinygrad's bf16 emulation on CPU the stored copy rounds to nearest even as the reference
    does, except that float32 values below bfloat16's normal range flush to zero."""
    if precision == "float32":
        yield
        return
    if precision != "mixed_bfloat16":
        raise BackendError(f"tinygrad does not implement precision={precision!r}")
    from .backend import ensure_bfloat16  # backend.py imports this module: import on use

    state = nn.state.get_state_dict(model)
    ensure_bfloat16(next(iter(state.values())).device)
    owners = {name: _owner(model, name) for name in state}
    try:
        for name, (owner, attr) in owners.items():
            # contiguous: a stored bfloat16 copy, rounded to nearest even; a cast fused into its consumers
            # would stay float32 under tinygrad's bf16 emulation on CPU
            setattr(owner, attr, state[name].cast(dtypes.bfloat16).contiguous())
        yield
    finally:
        for name, (owner, attr) in owners.items():
            setattr(owner, attr, state[name])


def _owner(model, name: str) -> tuple[object, str]:
    """The object holding a canonical parameter, and its attribute:
    "h.0.attn.c_attn.weight" -> (model.h[0].attn.c_attn, "weight")."""
    *path, attr = name.split(".")
    obj = model
    for part in path:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj, attr


def _tensor(a, dtype, device) -> Tensor:
    """Token ids as int32 (ids and -100 fit, every device's native int), draws as float32, on the model's
    device; on a model replicated over several devices (replicate), sharded over them by rows (SPEC.md 25)."""
    if isinstance(device, tuple):
        t = _tensor(a, dtype, device[0])
        return t.shard(device, axis=0 if t.ndim == 2 else 1)  # tokens (B, T); draws (n_layer, B, T)
    if isinstance(a, Tensor):
        return a.cast(dtype).to(device)
    return Tensor(np.ascontiguousarray(a, dtype=np.int32 if dtype == dtypes.int32 else np.float32), device=device)


def replicate(model: LanguageModel, devices: tuple[str, ...]) -> None:
    """Data parallel in one process (SPEC.md 25): every weight copied to each of `devices`, in place, so
    that a batch sharded over them by rows computes each shard on its device and backward all-reduces
    the gradients. Build the optimizer after this: its moments are made on the weights' devices."""
    Tensor.realize(*(t.to_(devices) for t in nn.state.get_state_dict(model).values()))


# -- the optimizer's state in canonical names (TrainState, SPEC.md 20) --------------------------------
def optimizer_moments(model: LanguageModel, optimizer: nn.optim.OptimizerGroup) -> dict[str, tuple[Tensor, Tensor]]:
    """canonical name -> (m, v), the optimizer's own Tensors, in the canonical table's order."""
    names = {id(t): n for n, t in nn.state.get_state_dict(model).items()}
    if any(id(p) not in names for opt in optimizer.optimizers for p in opt.params):
        raise BackendError("this optimizer updates Tensors that are not the model's weights: "
                           "configure_optimizer(model, ...) with the model it trains")
    held = {names[id(p)]: (m, v) for opt in optimizer.optimizers for p, m, v in zip(opt.params, opt.m, opt.v)}
    return {n: held[n] for n in nn.state.get_state_dict(model) if n in held}


def load_moments(model: LanguageModel, optimizer: nn.optim.OptimizerGroup, step: int,
                 m: Mapping[str, np.ndarray], v: Mapping[str, np.ndarray]) -> None:
    """Write a saved step count and moments into the optimizer's Tensors, so the next step is the one an
    uninterrupted run would take: b1_t, b2_t are the float32 running products of `step` factors, as
    the optimizer itself multiplies them."""
    writes = []
    for name, (m_t, v_t) in optimizer_moments(model, optimizer).items():
        writes += [m_t.assign(Tensor(np.asarray(m[name], np.float32), device=m_t.device)),
                   v_t.assign(Tensor(np.asarray(v[name], np.float32), device=v_t.device))]
    for opt in optimizer.optimizers:
        for t, b in ((opt.b1_t, opt.b1), (opt.b2_t, opt.b2)):
            writes.append(t.assign(Tensor([float32_power(b, step)], dtype=dtypes.float32, device=t.device)))
    Tensor.realize(*writes)
    optimizer.steps_taken = int(step)


def float32_power(b: float, step: int) -> np.float32:
    """1 * b * b * ... (`step` factors), each product rounded to float32: tinygrad's `b_t *= b`."""
    if step == 0:
        return np.float32(1.0)
    return np.multiply.accumulate(np.full(int(step), b, dtype=np.float32), dtype=np.float32)[-1]
