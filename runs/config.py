"""RunConfig: everything that defines one training run, recorded in the run's progress.json.

The fields split in two. The *trajectory* fields decide which weights the run produces (the model,
its variant and size, the data, the batch and block size, the TrainSpec with its seed): a resumed
run must have the same ones, or it would be another run. The *operational* fields (backend,
device, compile, how many steps, how often to evaluate, log and checkpoint) may change on resume:
a run can be extended, checkpointed more often, or continued in another framework.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..spec import InputError, SpecError
from ..spec.train import TrainSpec

#: ModelSpec fields a preset may be resized by (--n-layer ...), so that CPU-sized models exist
SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
#: fields a resumed run may change (SPEC.md 22.3); every other field must match the checkpoint's
OPERATIONAL = ("backend", "device", "compile", "steps", "eval_interval", "eval_iters", "ckpt_interval",
               "log_interval", "sample_tokens", "hellaswag", "hellaswag_limit", "devices", "fsdp")
PRECISION_ALIASES = {"float32": "float32", "fp32": "float32", "mixed_bfloat16": "mixed_bfloat16",
                     "bfloat16": "mixed_bfloat16", "bf16": "mixed_bfloat16"}


@dataclass(frozen=True)
class RunConfig:
    backend: str
    model: str                          # a ModelSpec preset name, or a checkpoint load_checkpoint reads
    data: str                           # the token-shard directory (gptspec.data.TokenShards)
    steps: int                          # optimizer steps in the whole run (a resume may raise it)
    train_spec: TrainSpec = field(default_factory=TrainSpec)
    variant: str | None = None          # spec/variants.py, applied to a preset
    sizes: dict = field(default_factory=dict)   # SIZE_FIELDS overrides of a preset
    batch_size: int = 16
    block_size: int = 64
    eval_interval: int = 100            # validation loss (and a sample) every this many steps, and at the end
    eval_iters: int = 20                # validation batches per evaluation
    ckpt_interval: int = 500            # a checkpoint every this many steps, and at the end
    log_interval: int = 10              # plain-text progress lines (not a terminal) every this many steps
    sample_tokens: int = 48             # tokens of the text sample at each evaluation (0: none)
    hellaswag: str | None = None        # a HellaSwag jsonl scored at each evaluation (SPEC.md 23), or None
    hellaswag_limit: int | None = None  # its first N examples (None: all)
    device: str | None = None
    compile: bool | None = None         # None: the backend's measured default (runs/compile.py)
    devices: int = 1                    # tinygrad: data parallel over this many devices in one process (SPEC.md 25)
    fsdp: bool = False                  # torch under torchrun: shard the model with fully_shard (SPEC.md 25.7)

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "block_size", "eval_interval", "eval_iters", "ckpt_interval",
                     "log_interval", "devices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.sample_tokens, bool) or not isinstance(self.sample_tokens, int) or self.sample_tokens < 0:
            problems.append(f"sample_tokens must be an int >= 0, got {self.sample_tokens!r}")
        if not isinstance(self.fsdp, bool):
            problems.append(f"fsdp must be True or False, got {self.fsdp!r}")
        if self.hellaswag_limit is not None and (isinstance(self.hellaswag_limit, bool)
                                                 or not isinstance(self.hellaswag_limit, int) or self.hellaswag_limit < 1):
            problems.append(f"hellaswag_limit must be None or an int >= 1, got {self.hellaswag_limit!r}")
        unknown = sorted(set(self.sizes) - set(SIZE_FIELDS))
        if unknown:
            problems.append(f"sizes may set {', '.join(SIZE_FIELDS)}, not {', '.join(unknown)}")
        if not isinstance(self.train_spec, TrainSpec):
            problems.append(f"train_spec must be a TrainSpec, got {type(self.train_spec).__name__}")
        if problems:
            raise InputError("invalid run config: " + "; ".join(problems))

    @property
    def seed(self) -> int:
        """The run's one seed (TrainSpec.seed): the initial weights, the batches and the samples."""
        return self.train_spec.seed

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.train_spec.grad_accum

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["train_spec"] = self.train_spec.to_dict()
        d["sizes"] = dict(sorted(self.sizes.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"run config: unknown field(s) {', '.join(unknown)}")
        d["train_spec"] = TrainSpec.from_json(json.dumps(d.get("train_spec", {})))
        return cls(**d)

    def differences(self, other: "RunConfig") -> list[str]:
        """The trajectory fields in which `other` differs from this config, as 'field: mine -> theirs'."""
        mine, theirs = self.to_dict(), other.to_dict()
        out = []
        for k in mine:
            if k in OPERATIONAL or k == "data" or mine[k] == theirs[k]:
                continue
            if isinstance(mine[k], dict):  # the TrainSpec and the sizes: name the fields that differ
                out += [f"{k}.{f}: {mine[k].get(f)!r} -> {theirs[k].get(f)!r}" for f in sorted({*mine[k], *theirs[k]})
                        if mine[k].get(f) != theirs[k].get(f)]
            else:
                out.append(f"{k}: {mine[k]!r} -> {theirs[k]!r}")
        return out


def train_spec_from(preset: str | None, overrides: dict[str, Any], steps: int | None) -> TrainSpec:
    """A TrainSpec: the preset's (or TrainSpec()'s defaults, torch.optim.AdamW's), then the overrides.

    A cosine schedule given no length runs over the whole run (max_steps = steps); a preset keeps its
    recipe's length (SPEC.md 20.7), whatever number of steps this run takes."""
    base = TrainSpec.preset(preset) if preset else TrainSpec()
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes.get("schedule", base.schedule) == "cosine" and base.max_steps is None and "max_steps" not in changes:
        changes["max_steps"] = steps
    return with_overrides(base, changes)


def with_overrides(base: TrainSpec, overrides: dict[str, Any]) -> TrainSpec:
    """`base` with the given fields replaced (validated by TrainSpec); precision takes its aliases."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "precision" in changes:
        p = changes["precision"]
        if p not in PRECISION_ALIASES:
            raise SpecError(f"precision must be one of {sorted(set(PRECISION_ALIASES))}, got {p!r}")
        changes["precision"] = PRECISION_ALIASES[p]
    return base.replace(**changes)
