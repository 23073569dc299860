"""Named variants: a variant is a set of ModelSpec field values (SPEC.md defines each one).

`gptspec conformance --variant NAME` runs the suite on every case's model with these values;
`gptspec variants` lists them. Adding a variant: its fields and math in SPEC.md, the field
values in config.py, the reference, each backend, then one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import OPTIONS, ModelSpec
from .errors import SpecError


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    section: str                       # where SPEC.md defines it
    changes: dict[str, Any] = field(default_factory=dict)

    def apply(self, spec: ModelSpec) -> ModelSpec:
        return spec.replace(**self.changes)


_NGPT = dict(architecture="ngpt", positions="rope", mlp="swiglu")

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("gpt2", "GPT-2 as published", "3"),
    Variant("softmax1", "quiet attention: e^x / (1 + sum e^x)", "10.1", dict(attention="softmax1")),
    Variant("softmax_c", "constant sink: e^x / (c + sum e^x), c = 1e-3 as in the published experiment",
            "10.1", dict(attention="softmax_c", softmax_c=1e-3)),
    Variant("learned_sinks", "one learned sink logit per head and layer, starting at softmax1", "10.1",
            dict(attention="learned_sinks")),
    Variant("rmsnorm", "RMSNorm x / sqrt(mean(x^2) + eps) * g in place of every LayerNorm (seed 002)", "14",
            dict(norm="rmsnorm")),
    Variant("layernorm-noaffine", "LayerNorm without gain and bias (seed 002)", "14",
            dict(norm="layernorm_noaffine")),
    Variant("no-bias", "no biases in linear layers and LayerNorms (nanoGPT's bias=False)", "15", dict(bias="off")),
    Variant("ngpt", "the normalized Transformer as NVIDIA's code has it: SwiGLU, |alpha|, 1/sqrt(d), RoPE",
            "11", _NGPT),
    Variant("ngpt-nope", "nGPT without positional encoding", "11", dict(_NGPT, positions="none")),
    Variant("ngpt-seed", "nGPT as seed 000 writes it: GELU MLP, signed alpha, s_qk and s_z scaled by 1/d",
            "11", dict(_NGPT, mlp="gelu", ngpt_alpha="signed", ngpt_scale="inv_d")),
]}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise SpecError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}") from None


def variant_name(spec: ModelSpec) -> str:
    """The variant whose option values `spec` has (its constants, e.g. softmax_c, may differ), or 'custom'."""
    for v in VARIANTS.values():
        named = v.apply(ModelSpec())
        if all(getattr(named, o) == getattr(spec, o) for o in OPTIONS):
            return v.name
    return "custom"
