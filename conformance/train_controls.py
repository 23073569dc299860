"""Training negative controls: deliberately broken torch training steps the trajectory checks must flag
(SPEC.md 20.11).

Each control is one realistic bug of a training loop, injected into the otherwise correct torch
backend and run through `run_trajectory` exactly as a real backend is: it must produce at least one
numeric failure (an error beyond its bound, not only a note), while the correct torch backend passes
the same checks on the same case.

The seam, documented so that a new control needs no knowledge of the backend's private state. A
`TrainControl` breaks the torch backend's training (backends/torch/train.py, reached through the
backend's `_optimizer` and `_train_step` hooks) at one of three points, each through torch's public API:

- `optimizer(model, train_spec) -> torch.optim.Optimizer`: the optimizer the step drives, in place of
  train.configure_optimizer (its state keeps torch's AdamW names: step, exp_avg, exp_avg_sq);
- `hook(model, optimizer, train_spec)`: called on the built optimizer, e.g. to register a
  `register_step_pre_hook` that changes the gradients or the learning rate just before the update;
- `model(module)`: the built nn.Module, through its public methods (`loss`, `normalize_`);
- `train_spec`: field values of the TrainSpec the step is given, while the optimizer's configuration,
  the hook and the reference get the case's true one (the step computes as if the spec said otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from ..spec.train import CLIP_EPS, lr_at
from .trajectory import TrajectoryCase, run_trajectory


@dataclass(frozen=True)
class TrainControl:
    name: str
    variant: str = "gpt2"
    optimizer: Callable | None = None   # (model, train_spec) -> torch optimizer
    hook: Callable | None = None        # (model, optimizer, train_spec) -> None
    model: Callable | None = None       # (torch module) -> None, in place
    train_spec: tuple = ()              # (field, value) pairs of the TrainSpec the step is given

    def backend(self):
        """The torch backend with this control's bug in its training."""
        from ..backends.torch.backend import TorchBackend

        control = self

        class Broken(TorchBackend):
            name = f"torch[{control.name}]"

            def build(self, spec, params, dtype="float32", device=None):
                model = super().build(spec, params, dtype, device)
                if control.model:
                    control.model(model)
                return model

            def _optimizer(self, model, train_spec):
                optimizer = (control.optimizer(model, train_spec) if control.optimizer
                             else super()._optimizer(model, train_spec))
                if control.hook:
                    control.hook(model, optimizer, train_spec)
                return optimizer

            def _train_step(self, model, optimizer, train_spec, it, micro_batches, draws):
                return super()._train_step(model, optimizer, train_spec.replace(**dict(control.train_spec)), it,
                                           micro_batches, draws)

        return Broken()


# -- an AdamW written out, with the dialects the spec rules out as switches --------------------------
def _adamw_dialect(**dialect):
    """An optimizer factory: AdamW in plain torch, two groups by the spec's decay split, in one of the
    dialects SPEC.md 20.6 names (with no switch set it is the spec's AdamW)."""
    def make(model, train_spec):
        from ..spec.train import decay_split

        params = dict(model.named_parameters())
        decayed, kept = decay_split(model.spec, train_spec)
        groups = [{"params": [params[n] for n in names], "weight_decay": wd}
                  for names, wd in ((decayed, train_spec.weight_decay), (kept, 0.0)) if names]
        return DialectAdamW(groups, lr=lr_at(train_spec, 0), betas=train_spec.betas, eps=train_spec.eps, **dialect)
    return make


def _optimizer_class():
    import torch

    class _DialectAdamW(torch.optim.Optimizer):
        """AdamW in torch's single-tensor order of operations, with switches for the usual deviations."""

        def __init__(self, params, lr, betas, eps, bias_correction=True, eps_inside_sqrt=False,
                     coupled_decay=False, step_offset=0):
            # fused/capturable: the keys torch.optim.AdamW's groups carry, read by the backend's state loader
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, fused=None,
                                          capturable=False))
            self.dialect = dict(bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt,
                                coupled_decay=coupled_decay, step_offset=step_offset)

        @torch.no_grad()
        def step(self, closure=None):
            d = self.dialect
            for group in self.param_groups:
                lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                for p in group["params"]:
                    state = self.state[p]
                    if not state:
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    t = state["step"].item() + d["step_offset"]
                    g = p.grad
                    if d["coupled_decay"]:
                        g = g.add(p, alpha=wd)          # torch.optim.Adam(weight_decay=): L2 in the gradient
                    else:
                        p.mul_(1 - lr * wd)             # decoupled, first
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if d["bias_correction"] else (1.0, 1.0)
                    if d["eps_inside_sqrt"]:
                        denom = (v / bc2 + eps).sqrt()
                    else:
                        denom = v.sqrt() / math.sqrt(bc2) + eps
                    p.addcdiv_(m, denom, value=-lr / bc1)

    return _DialectAdamW


class _Lazy:
    """DialectAdamW, built on first use so that importing this module imports no torch."""

    def __call__(self, *args, **kwargs):
        return _optimizer_class()(*args, **kwargs)


DialectAdamW = _Lazy()


# -- bugs in the optimizer's configuration ----------------------------------------------------------
def decay_everything(model, train_spec):
    # one parameter group: biases, LayerNorm gains and sinks decay too
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr_at(train_spec, 0), betas=train_spec.betas,
                             eps=train_spec.eps, weight_decay=train_spec.weight_decay)


# -- bugs around the update (step pre-hooks: the gradients are accumulated and clipped, lr pushed) ---
def per_tensor_clipping(model, optimizer, train_spec):
    # with the step's global clipping off (train_spec=dict(grad_clip=None)), each tensor is clipped to
    # grad_clip on its own norm just before the update
    import torch

    def clip_each(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                coef = train_spec.grad_clip / (float(torch.linalg.vector_norm(p.grad, dtype=torch.float64)) + CLIP_EPS)
                if coef < 1:
                    p.grad.mul_(coef)

    optimizer.register_step_pre_hook(clip_each)


def warmup_off_by_one(model, optimizer, train_spec):
    # nanoGPT's warmup lr * (it + 1) / (warmup + 1) in place of the spec's lr * (it + 1) / warmup
    def push(opt, args, kwargs):
        state = next((opt.state[p] for g in opt.param_groups for p in g["params"] if opt.state[p]), None)
        it = 0 if state is None else int(state["step"].item())
        if it < train_spec.warmup_steps:
            for group in opt.param_groups:
                group["lr"] = train_spec.lr * (it + 1) / (train_spec.warmup_steps + 1)

    optimizer.register_step_pre_hook(push)


# -- bugs in the model's part of the step -----------------------------------------------------------
def summed_micro_batches(model, optimizer, train_spec):
    # each micro-batch's loss added, not averaged: the step divides by n, so each loss arrives n times larger
    if "loss" in vars(model):  # wrapped by an earlier optimizer of the same model (a resumed segment)
        return
    loss, n = model.loss, train_spec.grad_accum
    model.loss = lambda tokens, targets, draws=None: loss(tokens, targets, draws) * n


def no_post_step_normalization(model):
    model.normalize_ = lambda: None


CONTROLS = (
    TrainControl("adamw-without-bias-correction", optimizer=_adamw_dialect(bias_correction=False)),
    TrainControl("eps-inside-sqrt", optimizer=_adamw_dialect(eps_inside_sqrt=True)),
    TrainControl("coupled-l2-decay", optimizer=_adamw_dialect(coupled_decay=True)),
    TrainControl("decay-on-biases-and-gains", optimizer=decay_everything),
    TrainControl("per-tensor-clipping", hook=per_tensor_clipping, train_spec=(("grad_clip", None),)),
    TrainControl("warmup-off-by-one", hook=warmup_off_by_one),
    TrainControl("accumulation-summed", hook=summed_micro_batches),
    TrainControl("ngpt-without-normalization", "ngpt", model=no_post_step_normalization),
    TrainControl("step-counter-off-by-one", optimizer=_adamw_dialect(step_offset=1)),
)
#: the spec's AdamW written out by hand with every switch off: must pass like torch.optim.AdamW
POSITIVE = TrainControl("dialect-adamw-as-specified", optimizer=_adamw_dialect())


@dataclass
class TrainControlResult:
    name: str
    variant: str
    case: str
    flagged: bool          # at least one numeric failure (not only a note)
    worst_ratio: float     # the largest error/bound of a numeric check
    worst_check: str       # its quantity and tensor
    correct_ok: bool       # the correct torch training passed the same checks
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.flagged and self.correct_ok


def control_case(control: TrainControl) -> TrajectoryCase:
    """test-mini of the control's variant, 4 steps (the default tier's case)."""
    return TrajectoryCase("test-mini", 0, batch=2, length=32, steps=4, variant=control.variant)


def run_control(control: TrainControl, case: TrajectoryCase | None = None) -> TrainControlResult:
    """The control and the correct torch backend through the same trajectory checks (float32, cpu)."""
    from ..backends.torch.backend import TorchBackend

    case = case or control_case(control)
    right, wrong = run_trajectory([TorchBackend(), control.backend()], case, "float32", "cpu", pairwise=False)
    numeric = [c for c in wrong.failures if not c.note]
    worst = max(numeric, key=lambda c: c.worst_ratio, default=None)
    return TrainControlResult(
        control.name, control.variant, case.id, flagged=bool(numeric) and not wrong.ok,
        worst_ratio=worst.worst_ratio if worst else (math.nan if wrong.status != "ran" else 0.0),
        worst_check=f"{worst.quantity} {worst.tensor}" if worst else "", correct_ok=right.ok,
        message=wrong.message if wrong.status != "ran" else "")


def run_controls(names: Iterable[str] | None = None,
                 on_result: Callable[[TrainControlResult], None] | None = None) -> list[TrainControlResult]:
    wanted = None if names is None else set(names)
    results = []
    for control in CONTROLS:
        if wanted is None or control.name in wanted:
            results.append(run_control(control))
            if on_result:
                on_result(results[-1])
    return results
