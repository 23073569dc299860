"""Training an MLX model to SPEC.md section 20, the way an MLX user writes the loop:

    optimizer = configure_optimizer(model, train_spec)
    for it, micro_batches in enumerate(batches):
        loss, grad_norm, lr = train_step(model, optimizer, train_spec, it, micro_batches)

`configure_optimizer` returns mlx.optimizers' own object: a MultiOptimizer of two AdamW, the
decayed group (spec.train.decay_split) and the rest, with bias correction ON (MLX's default is
off: 3.16x the first update with betas (0.9, 0.999)). `train_step` pushes the schedule's lr into
it (no MLX scheduler: MLX evaluates schedules before its step increment), accumulates
mx.value_and_grad's gradients of loss / n, clips by the global norm with torch's formula (scale by
max_norm / (norm + 1e-6) when below 1, as optim.clip_grad_norm does), updates, and renormalizes nGPT's
matrices.

Not optim.clip_grad_norm itself: it sums each gradient's squares with one MLX reduction, which on
the CPU adds one term at a time; over GPT-2's 50257 x 768 token embedding that sum came out 9.6% low
(the norm 4.8% low, so clipping scaled by 1.05x too much), where the blocked sum of losses.py is 2e-6
off. Same formula, accurate sum.

Where MLX's AdamW cannot compute torch's step exactly: it holds lr as a float32 array and forms the
bias corrections in float32 (`1 - b2**step` from b2 rounded to float32, and lr / (1 - b1**step)),
where torch forms them in Python double. float32(0.999) is 1.3e-8 above 0.999, so with beta2 = 0.999
1 - beta2^t comes out 1.3e-5 small (relative) for t << 1000 and every update ~6.4e-6 (relative) too
small where sqrt(v) >> eps (measured: 6.8e-6 in the weight change after one step); with beta2 = 0.95
it is 1.2e-7, and beta1 = 0.9 adds 2.4e-7: float32 roundoff. tests/test_training.py (test_one_update_fed_the_same_gradients_is_the_specs_adamw)
holds the measured deviation (6.7e-6 with beta2 = 0.999) between 3e-6 and 1e-5.
"""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce

from ...spec import BackendError, param_table
from ...spec.train import CLIP_EPS, TrainSpec, decay_split, lr_at
from ..base import check_finite_step
from .losses import blocked_sum

_COMPUTE_DTYPES = {"float32": mx.float32, "mixed_bfloat16": mx.bfloat16}


def configure_optimizer(model: nn.Module, train_spec: TrainSpec) -> optim.MultiOptimizer:
    """AdamW as torch computes it (bias-corrected, decoupled decay first), in two groups: the tensors
    spec.train.decay_split decays (weight_decay) and the rest (none). Its state is created now, so
    step 0's zero moments exist before the first update (MLX otherwise creates them lazily)."""
    _require_float32_masters(model)
    decayed = frozenset(decay_split(model.spec, train_spec)[0])

    def adamw(weight_decay: float) -> optim.AdamW:
        return optim.AdamW(learning_rate=lr_at(train_spec, 0), betas=list(train_spec.betas),
                           eps=train_spec.eps, weight_decay=weight_decay, bias_correction=True)

    optimizer = optim.MultiOptimizer([adamw(train_spec.weight_decay), adamw(0.0)],
                                     filters=[lambda path, _: path in decayed])
    optimizer.init(model.trainable_parameters())
    return optimizer


def train_step(model: nn.Module, optimizer: optim.Optimizer, train_spec: TrainSpec, it: int,
               micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
               draws: Sequence[np.ndarray] | None = None) -> tuple[float, float, float]:
    """Iteration `it` (0-based): lr_at(it), the gradient averaged over the micro-batches, the global
    norm (clipped when grad_clip is set), one AdamW update, nGPT's normalization. Returns
    (loss, grad norm before clipping, lr). A non-finite loss or gradient stops before the update."""
    _require_float32_masters(model)
    lr = lr_at(train_spec, it)
    n = len(micro_batches)
    with mx.stream(model.device):
        loss, grads = _accumulate(model, train_spec, micro_batches, draws, n)
        parallel = getattr(model, "_data_parallel", None)
        if parallel is not None:  # runs/distributed.py under mlx.launch: every rank's mean (SPEC.md 25)
            grads = parallel.average(grads)
        norm = global_norm(grads)
        grads_to_apply = grads if train_spec.grad_clip is None else clip(grads, norm, train_spec.grad_clip)
        mx.eval(loss, norm)  # the divergence check reads them on the host before anything is applied
        check_finite_step(it, loss.item(), norm.item(), lambda: _canonical_numpy(model, grads))
        optimizer.learning_rate = lr  # every group: MultiOptimizer's setter forwards it
        optimizer.update(model, grads_to_apply)
        if model.spec.has_unit_norm_weights:  # SPEC.md 20.8: the normalization is part of the step
            model.normalize_()
        mx.eval(model.parameters(), optimizer.state)
    return loss.item(), norm.item(), lr


class _CompiledSteps:
    """The mx.compile'd loss-and-gradient functions of one model, by (compute dtype, n, with draws).
    A plain object, not a dict: an mlx Module would take a dict attribute into its parameter tree."""

    def __init__(self):
        self.functions = {}


def enable_compile(model: nn.Module) -> None:
    """Run each micro-batch's forward and backward through mx.compile from now on (`gptspec train
    --compile`). The compiled function takes the master weights as an input, as the eager one does, so
    it traces once per shape and replays; it fuses elementwise chains, which may round differently from
    the eager graph (the trajectory bounds of SPEC.md 20.11 hold it, tests/test_train_run.py)."""
    model._compiled_steps = _CompiledSteps()


def _loss_and_grad(model, compute_dtype, n: int, with_draws: bool):
    """mx.value_and_grad of a micro-batch's loss / n, compiled when enable_compile was called."""
    def micro_batch_loss(params, tokens, targets, step_draws=None):
        model.update(tree_map(lambda p: p.astype(compute_dtype), params))
        return model.loss(tokens, targets, step_draws) / n  # nanoGPT's loss / grad_accum before backward

    compiled = getattr(model, "_compiled_steps", None)
    if compiled is None:
        return mx.value_and_grad(micro_batch_loss)
    key = (compute_dtype, n, with_draws)
    if key not in compiled.functions:
        # without draws the compiled function takes three arrays: mx.compile takes no None inputs
        compiled.functions[key] = mx.compile(mx.value_and_grad(
            micro_batch_loss if with_draws else (lambda params, tokens, targets:
                                                 micro_batch_loss(params, tokens, targets))))
    return compiled.functions[key]


def _accumulate(model, train_spec, micro_batches, draws, n):
    """sum_k loss_k / n and its gradient, micro-batch by micro-batch, in float32 (SPEC.md 20.4).

    Under mixed_bfloat16 each micro-batch's forward and backward run on a bfloat16 copy of the
    float32 master weights: the cast is inside the differentiated function, so MLX's gradient of
    `astype` hands back float32 gradients of the masters (the bfloat16 ones, widened)."""
    compute_dtype = _COMPUTE_DTYPES[train_spec.precision]
    masters = model.trainable_parameters()
    loss_and_grad = _loss_and_grad(model, compute_dtype, n, draws is not None)
    loss, grads = mx.array(0.0), None
    try:
        for k, (tokens, targets) in enumerate(micro_batches):
            inputs = (masters, mx.array(tokens), mx.array(targets))
            if draws is not None:
                inputs += (mx.array(np.asarray(draws[k], np.float32)),)
            value, g = loss_and_grad(*inputs)
            loss = loss + value
            grads = g if grads is None else tree_map(mx.add, grads, g)
    finally:
        model.update(masters)  # the model holds its float32 masters again, whatever happened
    return loss, grads


def global_norm(grads) -> mx.array:
    """The L2 norm over every gradient (SPEC.md 20.5), each tensor's squares summed in blocks."""
    return mx.sqrt(tree_reduce(lambda acc, g: acc + blocked_sum(g.square().reshape(-1)), grads, 0.0))


def clip(grads, norm: mx.array, max_norm: float):
    """optim.clip_grad_norm's (and torch's) scaling: by max_norm / (norm + 1e-6), at most 1."""
    scale = mx.minimum(max_norm / (norm + CLIP_EPS), 1.0)
    return tree_map(lambda g: g * scale, grads)


def _canonical_numpy(model, grads) -> dict[str, np.ndarray]:
    """The gradients as numpy in canonical table order (the divergence report names the first bad one)."""
    flat = dict(tree_flatten(grads))
    return {info.name: np.array(flat[info.name]) for info in param_table(model.spec)}


def _require_float32_masters(model) -> None:
    dtypes = {str(p.dtype) for _, p in tree_flatten(model.trainable_parameters())}
    if dtypes != {str(mx.float32)}:
        raise BackendError(
            f"training needs float32 master weights (SPEC.md 20.9), but the model holds {sorted(dtypes)}: "
            "build it with dtype='float32'; TrainSpec(precision='mixed_bfloat16') computes in bfloat16")


# -- data parallel (SPEC.md 25): mx.distributed under mlx.launch ----------------------------------------------
class _DataParallel:
    """The group a rank averages its gradients over. A plain object: an mlx Module would take a dict
    attribute into its parameter tree."""

    def __init__(self, group, fault=None):
        self.group, self.fault = group, fault

    def average(self, grads):
        if self.fault is None:
            return nn.average_gradients(grads, group=self.group)  # all_sum, then / W
        kind, divisor = self.fault  # negative controls only (runs/distributed.py)
        if kind == "skip_sync":
            return grads
        return tree_map(lambda g: mx.distributed.all_sum(g, group=self.group) / divisor, grads)


def attach_group(model: nn.Module, group, fault=None) -> None:
    """Average every step's gradients over `group` (mx.distributed.init()'s) with nn.average_gradients."""
    model._data_parallel = _DataParallel(group, fault)
