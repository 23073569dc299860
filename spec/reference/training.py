"""The float64 reference training loop (SPEC.md section 20): N optimizer steps of a TrainSpec.

Each step: the learning rate from `lr_at`; the gradient accumulated over the step's micro-batches
(mean of the micro-batch means); the global gradient norm and torch's clipping; AdamW in
torch.optim.AdamW's order of operations; nGPT's post-step normalization. The arithmetic follows
torch's single-tensor AdamW and clip_grad_norm_ operation by operation, so in float64 the two differ
only by torch's fused multiply-adds (tests/test_train_reference.py measures it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..checks import check_state_shapes
from ..config import ModelSpec
from ..errors import InputError, SpecError, WeightsError
from ..params import param_table
from ..train import CLIP_EPS, TrainingDiverged, TrainSpec, decays, lr_at
from . import loss_and_grads, normalize_weights

_STATE_FORMAT = "gptspec-train-state"
_GROUPS = ("params", "m", "v")


@dataclass
class TrainState:
    """Everything a run needs to continue: the weights and AdamW's moments, keyed by canonical names.

    `step` counts the optimizer steps taken (torch's state["step"]); the next update uses bias
    corrections with t = step + 1 and the learning rate lr_at(step).
    """
    step: int
    params: dict[str, np.ndarray]
    m: dict[str, np.ndarray]   # torch's exp_avg
    v: dict[str, np.ndarray]   # torch's exp_avg_sq

    @classmethod
    def initial(cls, spec: ModelSpec, params: Mapping[str, np.ndarray]) -> "TrainState":
        check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "training weights")
        # subok: conditioning.py's Noisy weights stay Noisy (a training run's condition estimate)
        p = {info.name: np.array(params[info.name], dtype=np.float64, subok=True) for info in param_table(spec)}
        return cls(0, p, {n: np.zeros_like(a) for n, a in p.items()}, {n: np.zeros_like(a) for n, a in p.items()})

    def copy(self) -> "TrainState":
        return TrainState(int(self.step), *({n: np.array(a, dtype=np.float64, subok=True)
                                             for n, a in getattr(self, g).items()} for g in _GROUPS))

    def check(self, spec: ModelSpec) -> None:
        """Names and shapes of the weights and both moments against the model; a step count >= 0."""
        if isinstance(self.step, bool) or not isinstance(self.step, (int, np.integer)) or self.step < 0:
            raise WeightsError(f"optimizer state: step must be an int >= 0, got {self.step!r}")
        for group, what in zip(_GROUPS, ("weights", "first moments (m, exp_avg)", "second moments (v, exp_avg_sq)")):
            check_state_shapes(spec, {n: np.shape(a) for n, a in getattr(self, group).items()},
                               f"optimizer state: {what}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)      # per step: the mean of the micro-batch losses
    grad_norms: list[float] = field(default_factory=list)  # per step: the global norm before clipping
    lrs: list[float] = field(default_factory=list)         # per step: the learning rate used
    state: TrainState | None = None                        # after the last step

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.state.params


def train(spec: ModelSpec, train_spec: TrainSpec, params, batches: Sequence[Sequence[tuple]],
          draws: Sequence[Sequence[np.ndarray]] | None = None) -> TrainResult:
    """Run len(batches) optimizer steps in float64.

    params: the starting weights (fresh moments, step 0), or a TrainState to continue from.
    batches[i]: the grad_accum micro-batches (tokens, targets) of step i.
    draws[i][k]: loss="early_exit"'s uniforms for micro-batch k of step i (SPEC.md 18.3); None otherwise.
    """
    if not isinstance(train_spec, TrainSpec):
        raise SpecError(f"train_spec must be a TrainSpec, got {type(train_spec).__name__}")
    if isinstance(params, TrainState):
        params.check(spec)
        state = params.copy()
    else:
        state = TrainState.initial(spec, params)
    _check_batches(spec, train_spec, batches, draws)
    result = TrainResult()
    for i, micro_batches in enumerate(batches):
        loss, norm, lr = train_step(spec, train_spec, state, micro_batches, None if draws is None else draws[i])
        result.losses.append(loss)
        result.grad_norms.append(norm)
        result.lrs.append(lr)
    result.state = state
    return result


def train_step(spec: ModelSpec, train_spec: TrainSpec, state: TrainState, micro_batches, draws=None):
    """One optimizer step, in place on `state`; returns (loss, grad norm before clipping, lr)."""
    it = int(state.step)
    lr = lr_at(train_spec, it)
    loss, grads = accumulate(spec, train_spec, state.params, micro_batches, draws, it)
    norm = clip_grads(grads, train_spec.grad_clip)
    adamw_update(train_spec, state, grads, lr)
    if spec.architecture == "ngpt":  # SPEC.md 11.3: the normalization is part of the step
        state.params.update(normalize_weights(spec, state.params))
    _check_finite(state.params, it, "weight after the update")
    return loss, norm, lr


def accumulate(spec, train_spec, params, micro_batches, draws, it):
    """The mean of the micro-batch mean losses and of their gradients, summed in micro-batch order.

    Each micro-batch's loss is its own mean over its own counted targets (SPEC.md 4), divided by the
    number of micro-batches before it is added (nanoGPT's `loss / gradient_accumulation_steps`).
    """
    n = train_spec.grad_accum
    weights = _compute_weights(train_spec, params)
    # canonical table order, whatever order `params` came in: it fixes the summation order of the norm
    loss, grads = 0.0, {info.name: np.zeros_like(params[info.name]) for info in param_table(spec)}
    for k, (tokens, targets) in enumerate(micro_batches):
        r = loss_and_grads(spec, weights, tokens, targets, None if draws is None else draws[k])
        _check_finite(r.grads, it, f"gradient (micro-batch {k}, loss {r.loss!r})")
        if not np.isfinite(r.loss):
            raise TrainingDiverged(f"training iteration it={it}: the loss of micro-batch {k} is {r.loss!r}",
                                   it, None)
        loss += r.loss / n
        for name in grads:
            grads[name] += r.grads[name] / n
    return loss, grads


def _compute_weights(train_spec, params):
    """What the forward/backward reads: the master weights, rounded to bfloat16 under mixed precision
    (SPEC.md 7: the reference runs on the weights rounded to the compute dtype)."""
    if train_spec.precision == "float32":
        return params
    from ...weights.format import round_to_dtype  # spec/ sits below weights/: import on use

    # the rounding is the spec's, exact: done on plain values, then viewed as the input's class again (a Noisy
    # master weight gives a Noisy compute weight, whose forward and backward are perturbed)
    return {n: round_to_dtype(np.asarray(a), "bfloat16").astype(np.float64).view(type(a)) for n, a in params.items()}


def global_norm(grads: Mapping[str, np.ndarray]) -> float:
    """torch's clip_grad_norm_: the L2 norm of the per-tensor L2 norms."""
    norms = np.array([np.linalg.norm(g.reshape(-1)) for g in grads.values()], dtype=np.float64)
    return float(np.linalg.norm(norms))


def clip_grads(grads: dict[str, np.ndarray], max_norm: float | None) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) in place; return the pre-clip norm."""
    total = global_norm(grads)
    if max_norm is not None:
        coef = max_norm / (total + CLIP_EPS)
        if coef < 1.0:  # torch multiplies by the clamped coefficient; by 1.0 is the identity
            for name in grads:
                grads[name] *= coef
    return total


def adamw_update(train_spec: TrainSpec, state: TrainState, grads: Mapping[str, np.ndarray], lr: float) -> None:
    """torch.optim.AdamW's single-tensor step (torch/optim/adam.py, decoupled decay), in place."""
    beta1, beta2 = train_spec.betas
    state.step += 1
    t = float(state.step)  # torch keeps the step as a float tensor and reads it back as a Python float
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    for name, g in grads.items():
        p, m, v = state.params[name], state.m[name], state.v[name]
        if decays(train_spec, p.shape):
            p = p * (1 - lr * train_spec.weight_decay)       # decoupled, on the old weight, first
        m = _lerp(m, g, 1 - beta1)                           # exp_avg.lerp_(grad, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g                  # exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
        denom = np.sqrt(v) / bias_correction2_sqrt + train_spec.eps
        p = p + (-step_size) * m / denom                     # param.addcdiv_(exp_avg, denom, -step_size)
        state.params[name], state.m[name], state.v[name] = p, m, v


def _lerp(start, end, weight):
    """torch.lerp's formula, which switches form at weight 0.5 to stay exact at both ends."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def _check_finite(tensors: Mapping[str, np.ndarray], it: int, what: str) -> None:
    for name, a in tensors.items():  # canonical order: the first one named is the first to break
        if not np.isfinite(a).all():
            raise TrainingDiverged(
                f"training iteration it={it}: the {what} of {name!r} is not finite "
                f"({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} Inf); training stopped", it, name)


def _check_batches(spec, train_spec, batches, draws) -> None:
    n = train_spec.grad_accum
    for i, micro_batches in enumerate(batches):
        if len(micro_batches) != n:
            raise InputError(f"step {i} has {len(micro_batches)} micro-batch(es); grad_accum={n} needs {n}")
    if draws is None:
        return
    if len(draws) != len(batches):
        raise InputError(f"draws hold {len(draws)} step(s), batches {len(batches)}: one entry per step")
    for i, step_draws in enumerate(draws):
        if len(step_draws) != n:
            raise InputError(f"draws of step {i} hold {len(step_draws)} micro-batch(es); grad_accum={n} needs {n}")


# -- a run's state on disk ---------------------------------------------------------------
def save_state(path, spec: ModelSpec, train_spec: TrainSpec, state: TrainState) -> None:
    """A float64 safetensors file of the weights and moments ("params/<name>", "m/<name>", "v/<name>"),
    the step and both specs in its metadata. A state holding NaN or Inf is never written."""
    from safetensors.numpy import save_file

    from ...weights.atomic import atomic_write

    state.check(spec)
    tensors = {}
    for group in _GROUPS:
        for name, a in getattr(state, group).items():
            if not np.isfinite(a).all():
                raise WeightsError(f"optimizer state {group}/{name} holds NaN or Inf; refusing to write it")
            tensors[f"{group}/{name}"] = np.ascontiguousarray(a, dtype="<f8")
    metadata = {"format": _STATE_FORMAT, "step": str(int(state.step)),
                "model_spec": spec.to_json(), "train_spec": train_spec.to_json()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state(path, spec: ModelSpec | None = None) -> tuple[ModelSpec, TrainSpec, TrainState]:
    """The (ModelSpec, TrainSpec, TrainState) of a file written by save_state; `spec`, when given, must match."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _STATE_FORMAT:
            raise WeightsError(f"{path}: not a gptspec training state (metadata format={meta.get('format')!r})")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    stored_spec = ModelSpec.from_json(meta["model_spec"])
    if spec is not None and spec != stored_spec:
        raise WeightsError(f"{path}: the state is of model {stored_spec.to_json()}, not {spec.to_json()}")
    groups = {g: {} for g in _GROUPS}
    for key, a in arrays.items():
        group, _, name = key.partition("/")
        if group not in groups:
            raise WeightsError(f"{path}: unexpected tensor {key!r}; expected params/, m/ or v/ <canonical name>")
        groups[group][name] = a
    for g in _GROUPS:
        check_state_shapes(stored_spec, {n: a.shape for n, a in groups[g].items()}, f"{path} ({g})")
    in_table_order = [{info.name: groups[g][info.name] for info in param_table(stored_spec)} for g in _GROUPS]
    state = TrainState(int(meta["step"]), *in_table_order)
    return stored_spec, TrainSpec.from_json(meta["train_spec"]), state
