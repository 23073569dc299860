"""TrainSpec: the immutable, validated description of one training step (SPEC.md section 20).

AdamW as torch.optim.AdamW computes it, the learning-rate schedule, global-norm clipping, gradient
accumulation and the precision of a run, as named fields with validated values; the presets are the
recipes users know. `lr_at` is the schedule, computed once in float64 here and pushed into every
framework's optimizer each step, so no framework's own scheduler (each with its own off-by-one)
is ever in the loop. Defaults are torch.optim.AdamW's own (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01) at a constant learning rate.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import JSONSpec, ModelSpec
from .errors import SpecError
from .params import param_table

SCHEDULES = ("constant", "cosine")
DECAY_RULES = ("ndim>=2", "none")
PRECISIONS = ("float32", "mixed_bfloat16")
# torch.nn.utils.clip_grad_norm_'s guard: scale = max_norm / (total_norm + CLIP_EPS)
CLIP_EPS = 1e-6


class TrainingDiverged(ArithmeticError):
    """A loss, gradient or weight that became NaN or Inf during training: no step or checkpoint follows it."""

    def __init__(self, message: str, step: int, tensor: str | None):
        super().__init__(message)
        self.step = step        # the 0-based iteration `it` at which it happened
        self.tensor = tensor    # the first canonical tensor that went non-finite, None for the loss alone


@dataclass(frozen=True)
class TrainSpec(JSONSpec):
    lr: float = 1e-3                   # the maximum learning rate
    min_lr_ratio: float = 0.1          # schedule="cosine" decays to lr * min_lr_ratio
    warmup_steps: int = 0              # lr * (it+1) / warmup_steps while it < warmup_steps
    max_steps: int | None = None       # the schedule's length; None: unbounded (constant only)
    schedule: str = "constant"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay: str = "ndim>=2"             # which tensors decay: matrices and embeddings, or none
    grad_clip: float | None = None     # global-norm clipping threshold; None: no clipping
    grad_accum: int = 1                # micro-batches per optimizer step
    precision: str = "float32"
    seed: int = 0                      # the run's seed, for what draws randomness around the step

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # JSON gives lists; a frozen spec must stay hashable
            object.__setattr__(self, "betas", tuple(self.betas))
        problems = list(_problems(self)) or list(_combination_problems(self))
        if problems:
            raise SpecError("invalid TrainSpec: " + "; ".join(problems))

    @property
    def min_lr(self) -> float:
        """The floor of the cosine schedule (build-nanogpt's `min_lr = max_lr * 0.1`)."""
        return self.lr * self.min_lr_ratio if self.schedule == "cosine" else self.lr

    def replace(self, **changes: Any) -> "TrainSpec":
        return dataclasses.replace(self, **changes)

    # -- presets -----------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "TrainSpec":
        try:
            return cls(**TRAIN_PRESETS[name])
        except KeyError:
            raise SpecError(
                f"unknown TrainSpec preset {name!r}; known presets: {', '.join(TRAIN_PRESETS)}"
            ) from None

    # -- JSON --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problems(s: TrainSpec):
    if not _is_real(s.lr) or not math.isfinite(s.lr) or s.lr < 0:
        yield f"lr must be a finite float >= 0, got {s.lr!r}"
    if not _is_real(s.min_lr_ratio) or not (0 <= s.min_lr_ratio <= 1):
        yield f"min_lr_ratio must be a float in [0, 1], got {s.min_lr_ratio!r}"
    if not _is_int(s.warmup_steps) or s.warmup_steps < 0:
        yield f"warmup_steps must be an int >= 0, got {s.warmup_steps!r}"
    if s.max_steps is not None and (not _is_int(s.max_steps) or s.max_steps < 1):
        yield f"max_steps must be None or an int >= 1, got {s.max_steps!r}"
    if not (isinstance(s.betas, tuple) and len(s.betas) == 2):
        yield f"betas must be a pair (beta1, beta2), got {s.betas!r}"
    else:
        for i, b in enumerate(s.betas, 1):
            if not _is_real(b) or not (0 <= b < 1):  # NaN fails the comparison too
                yield f"betas[{i - 1}] (beta{i}) must lie in [0, 1), got {b!r}"
    if not _is_real(s.eps) or not math.isfinite(s.eps) or s.eps <= 0:
        yield f"eps must be a finite float > 0, got {s.eps!r}"
    if not _is_real(s.weight_decay) or not math.isfinite(s.weight_decay) or s.weight_decay < 0:
        yield f"weight_decay must be a finite float >= 0, got {s.weight_decay!r}"
    if s.grad_clip is not None and (not _is_real(s.grad_clip) or not math.isfinite(s.grad_clip)
                                    or s.grad_clip <= 0):
        yield f"grad_clip must be None (no clipping) or a finite float > 0, got {s.grad_clip!r}"
    if not _is_int(s.grad_accum) or s.grad_accum < 1:
        yield f"grad_accum must be an int >= 1 (micro-batches per step), got {s.grad_accum!r}"
    if not _is_int(s.seed) or s.seed < 0:
        yield f"seed must be an int >= 0, got {s.seed!r}"
    for name, legal in (("schedule", SCHEDULES), ("decay", DECAY_RULES), ("precision", PRECISIONS)):
        v = getattr(s, name)
        if v not in legal:
            yield f"{name} must be one of {list(legal)}, got {v!r}"


def _combination_problems(s: TrainSpec):
    if s.max_steps is not None and s.warmup_steps > s.max_steps:
        yield f"warmup_steps={s.warmup_steps} is longer than the run: max_steps={s.max_steps}"
    if s.schedule == "cosine" and s.max_steps is None:
        yield "schedule='cosine' needs max_steps, the step at which it reaches lr * min_lr_ratio"
    if s.min_lr_ratio != 0.1 and s.schedule != "cosine":
        yield f"min_lr_ratio={s.min_lr_ratio} applies only to schedule='cosine' (schedule is {s.schedule!r})"
    if s.decay == "none" and s.weight_decay != 0:
        yield f"weight_decay={s.weight_decay} has no tensor to apply to with decay='none'; set it to 0.0"


def lr_at(train_spec: TrainSpec, step: int) -> float:
    """The learning rate of iteration `step` (0-based: the update that makes the optimizer's step t = step+1).

    Warmup `lr * (step+1) / warmup_steps` (build-nanogpt's and llm.c's), then the cosine from lr down
    to min_lr over [warmup_steps, max_steps], min_lr after; "constant" stays at lr after warmup. Written
    in build-nanogpt's order of operations, in float64, so every backend receives the same number.
    """
    if not _is_int(step) or step < 0:
        raise SpecError(f"the schedule's step must be an int >= 0, got {step!r}")
    s = train_spec
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return float(s.lr)
    if step >= s.max_steps:  # at max_steps the cosine below gives min_lr exactly: cos(pi) = -1
        return s.min_lr
    decay_ratio = (step - s.warmup_steps) / (s.max_steps - s.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return s.min_lr + coeff * (s.lr - s.min_lr)


def decays(train_spec: TrainSpec, shape) -> bool:
    """Whether a tensor of this shape is in the decayed group under the spec's rule (whatever weight_decay is)."""
    return train_spec.decay == "ndim>=2" and len(tuple(shape)) >= 2


def decay_split(spec: ModelSpec, train_spec: TrainSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(decayed, not decayed) canonical names, in table order: a framework's two parameter groups."""
    table = param_table(spec)
    return (tuple(p.name for p in table if decays(train_spec, p.shape)),
            tuple(p.name for p in table if not decays(train_spec, p.shape)))


# The recipes users know. grad_accum is the single-process count (the micro-batches of one step on one
# device); `max_steps` is the schedule's length, not how many steps a test runs. SPEC.md 20.7.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT config/train_shakespeare_char.py on train.py's defaults (wd 0.1, clip 1.0, bf16 autocast).
    "nanogpt-shakespeare-char": dict(
        lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, max_steps=5000, schedule="cosine",
        betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum=1,
        precision="mixed_bfloat16", seed=1337),
    # nanoGPT train.py / config/train_gpt2.py: 12 x 1024 tokens x 40 micro-steps (5 x 8 GPUs).
    "nanogpt-gpt2": dict(
        lr=6e-4, min_lr_ratio=0.1, warmup_steps=2000, max_steps=600000, schedule="cosine",
        betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum=40,
        precision="mixed_bfloat16", seed=1337),
    # build-nanogpt train_gpt2.py, the GPT-2 124M run: 2**19 tokens = 8 micro-batches of 64 x 1024.
    "build-nanogpt-gpt2": dict(
        lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, max_steps=19073, schedule="cosine",
        betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum=8,
        precision="mixed_bfloat16", seed=1337),
    # llm.c test_gpt2.c: 10 steps at lr 1e-4; the PyTorch run that made its expected losses used
    # torch.optim.Adam(lr=1e-4): betas (0.9, 0.999), eps 1e-8, no decay (the C side's wd 0.01 was the
    # mismatch its loose tolerance hid), no clipping, float32.
    "llmc-test": dict(
        lr=1e-4, schedule="constant", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
        grad_clip=None, grad_accum=1, precision="float32", seed=42),
    # llm.c test_gpt2.cu: lr 1e-4, betas (0.9, 0.95), eps 1e-8, wd 0, global-norm clip at 1.0.
    "llmc-test-gpu": dict(
        lr=1e-4, schedule="constant", betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
        grad_clip=1.0, grad_accum=1, precision="float32", seed=42),
    # nGPT, seed 000's recipe (no weight decay, no warmup) with NVIDIA/ngpt train.py's numbers for what
    # the seed leaves open: lr 15e-4 cosine to 0 over 600000 steps, betas (0.9, 0.95), clip 1.0,
    # 64 micro-batches of 8 x 1024, bf16 autocast.
    "ngpt": dict(
        lr=15e-4, min_lr_ratio=0.0, warmup_steps=0, max_steps=600000, schedule="cosine",
        betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, decay="none", grad_clip=1.0, grad_accum=64,
        precision="mixed_bfloat16", seed=0),
}
