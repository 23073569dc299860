"""ModelSpec: the immutable, validated description of one GPT-2-family model.

Every architectural choice is a named field whose legal values are listed in
OPTIONS; a variant is a new value of a field (documented in SPEC.md and
implemented in the reference and every backend), never a backend flag.
Defaults are GPT-2's own values, so a spec written before a field existed
still means what it meant.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import SpecError

# Bumped when the meaning of an existing field or operator changes (SPEC.md, "Versioning").
SPEC_VERSION = "1"

# The legal values of every architectural option, first value = GPT-2's (SPEC.md section 1).
OPTIONS: dict[str, tuple[str, ...]] = {
    "architecture": ("gpt2", "ngpt"),
    "activation": ("gelu_tanh",),
    "norm": ("layernorm", "layernorm_noaffine", "rmsnorm"),
    "bias": ("on", "off"),
    "attention": ("softmax", "softmax1", "softmax_c", "learned_sinks"),
    "positions": ("learned", "rope", "none"),
    "mlp": ("gelu", "swiglu"),
    "ngpt_alpha": ("abs", "signed"),
    "ngpt_scale": ("inv_sqrt_d", "inv_d"),
    # Seed 002's experiments (SPEC.md 16-19)
    "blocks": ("independent", "shared"),
    "block_form": ("sequential", "parallel", "multiplicative", "normed_residual", "escape_normed",
                   "escape_residual"),
    "attention_values": ("projected", "identity"),
    "head_reduce": ("mean", "sum"),
    "loss": ("final", "all_layers", "all_layers_local", "early_exit"),
}
# Options an architecture takes beyond GPT-2's single value (all others must keep their default).
_ARCH_OPTIONS = {
    "gpt2": {name: OPTIONS[name] for name in (
        "attention", "norm", "bias", "blocks", "block_form", "attention_values", "head_reduce", "loss")},
    "ngpt": {"positions": ("rope", "none"), "mlp": OPTIONS["mlp"],
             "ngpt_alpha": OPTIONS["ngpt_alpha"], "ngpt_scale": OPTIONS["ngpt_scale"]},
}


class JSONSpec:
    """The JSON round trip of the spec's frozen configs (ModelSpec, TrainSpec): fields by name, and a
    field this version does not know refused by name, so a newer file never loads with a meaning lost."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise SpecError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"unknown {cls.__name__} field(s) {unknown} (written by a newer gptspec?); "
                f"known fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{cls.__name__} JSON does not parse: {e}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class ModelSpec(JSONSpec):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    norm: str = "layernorm"
    bias: str = "on"              # "off": no biases in linear layers and norms (nanoGPT's bias=False)
    attention: str = "softmax"
    softmax_c: float = 1.0        # the constant of attention="softmax_c": e^x / (c + sum e^x)
    architecture: str = "gpt2"
    positions: str = "learned"
    rope_base: float = 10000.0    # theta base of positions="rope"
    mlp: str = "gelu"
    ngpt_alpha: str = "abs"
    ngpt_scale: str = "inv_sqrt_d"
    blocks: str = "independent"   # "shared": one block applied n_layer times (SPEC.md 16)
    block_form: str = "sequential"
    parallel_attn_scale: float = 1.0  # c_a of block_form="parallel": h + c_a attn(x) + mlp(x)
    attention_values: str = "projected"  # "identity": q, k only, heads read the input itself (SPEC.md 17)
    head_reduce: str = "mean"     # how attention_values="identity" combines its heads
    loss: str = "final"           # SPEC.md 18
    vocab_multiple: int = 1       # nanoGPT pads the vocabulary to a multiple of 64 (SPEC.md 19)

    def __post_init__(self) -> None:
        problems = list(_problems(self)) or list(_combination_problems(self))
        if problems:
            raise SpecError("invalid ModelSpec: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of wte and width of the logits: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def sink_logit(self) -> float | None:
        """SPEC.md 10.1: the constant sink logit ln c of softmax1 (c = 1) and softmax_c; None otherwise
        (plain softmax, and learned sinks, whose logits are parameters)."""
        return {"softmax1": 0.0, "softmax_c": math.log(self.softmax_c)}.get(self.attention)

    @property
    def has_unit_norm_weights(self) -> bool:
        """Whether the parameter table has unit-norm matrices, which SPEC.md 11.3's weight normalization
        restores after every training step (nGPT's)."""
        from .params import param_table

        return any(p.unit_norm_axis is not None for p in param_table(self))

    @property
    def n_params(self) -> int:
        from .params import param_table

        return sum(math.prod(p.shape) for p in param_table(self))

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    # -- presets -----------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise SpecError(
                f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}"
            ) from None



def _problems(s: ModelSpec):
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_multiple"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int):
            yield f"{name} must be an int, got {v!r}"
        elif v < 1:
            yield f"{name} must be >= 1, got {v}"
    if (
        isinstance(s.n_embd, int) and isinstance(s.n_head, int)
        and s.n_head >= 1 and s.n_embd % s.n_head
    ):
        yield (
            f"n_embd ({s.n_embd}) must be divisible by n_head ({s.n_head}); "
            f"head_dim would be {s.n_embd / s.n_head:.4g}"
        )
    eps = s.norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
        yield f"norm_eps must be a float in (0, 1), got {eps!r}"
    for name, legal in OPTIONS.items():
        v = getattr(s, name)
        if v not in legal:
            yield f"{name} must be one of {list(legal)}, got {v!r}"
    for name in ("softmax_c", "rope_base"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            yield f"{name} must be a positive float, got {v!r}"
    v = s.parallel_attn_scale
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        yield f"parallel_attn_scale must be a finite float, got {v!r}"


def _combination_problems(s: ModelSpec):
    """Options that cannot combine (SPEC.md section 1): a clear error, never a silently different model."""
    allowed = _ARCH_OPTIONS[s.architecture]
    for name, legal in OPTIONS.items():
        value = getattr(s, name)
        if name == "architecture" or value in allowed.get(name, (legal[0],)):
            continue
        if name in allowed:
            yield f"{name}={value!r} cannot combine with architecture={s.architecture!r}; it takes {list(allowed[name])}"
        else:
            yield f"{name}={value!r} is not defined for architecture={s.architecture!r} (only {legal[0]!r})"
    if s.softmax_c != 1.0 and s.attention != "softmax_c":
        yield f"softmax_c={s.softmax_c} applies only to attention='softmax_c' (attention is {s.attention!r})"
    if s.rope_base != 10000.0 and s.positions != "rope":
        yield f"rope_base={s.rope_base} applies only to positions='rope' (positions is {s.positions!r})"
    if s.parallel_attn_scale != 1.0 and s.block_form != "parallel":
        yield (f"parallel_attn_scale={s.parallel_attn_scale} applies only to block_form='parallel' "
               f"(block_form is {s.block_form!r})")
    if s.head_reduce != "mean" and s.attention_values != "identity":
        yield (f"head_reduce={s.head_reduce!r} applies only to attention_values='identity' "
               f"(attention_values is {s.attention_values!r})")
    if s.vocab_multiple != 1 and s.architecture != "gpt2":
        yield f"vocab_multiple={s.vocab_multiple} is defined for architecture='gpt2' only"
    if s.positions == "rope" and s.head_dim % 2:
        yield f"positions='rope' rotates pairs of dimensions: head_dim ({s.head_dim}) must be even"


_GPT2 = dict(vocab_size=50257, n_positions=1024)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # Small sizes for tests: every operator present, seconds on a laptop CPU.
    "test-tiny": dict(vocab_size=61, n_positions=16, n_layer=1, n_head=2, n_embd=8),
    "test-mini": dict(vocab_size=257, n_positions=64, n_layer=2, n_head=4, n_embd=64),
}
REAL_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
