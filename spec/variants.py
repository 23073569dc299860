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
    Variant("shared-blocks", "one block applied n_layer times, its gradients summed over the applications (seed 002)",
            "16.1", dict(blocks="shared")),
    Variant("parallel", "parallel block h + c_a attn(ln_1 h) + mlp(ln_2 h), c_a = 0.5 (seed 002's P)", "16.2",
            dict(block_form="parallel", parallel_attn_scale=0.5)),
    Variant("multiplicative", "h + attn(ln_1 h) * mlp(ln_2 h), seed 002's best (AXM)", "16.2",
            dict(block_form="multiplicative")),
    Variant("normed-residual", "the residual runs through ln_1: y = ln_1 h + attn(ln_1 h); y + mlp(ln_2 y)", "16.2",
            dict(block_form="normed_residual")),
    Variant("escape-normed", "attention only feeds the MLP: ln_1 h + mlp(ln_2(h + attn(ln_1 h)))", "16.2",
            dict(block_form="escape_normed")),
    Variant("escape-residual", "attention only feeds the MLP: h + mlp(ln_2(h + attn(ln_1 h)))", "16.2",
            dict(block_form="escape_residual")),
    Variant("no-value", "attention without W_v and c_proj: the mean over heads of A_h x", "17",
            dict(attention_values="identity")),
    Variant("no-value-sum", "attention without W_v and c_proj: the sum over heads of A_h x", "17",
            dict(attention_values="identity", head_reduce="sum")),
    Variant("all-layer-loss", "the sum over layers of each layer's cross-entropy through ln_f and the head", "18.1",
            dict(loss="all_layers")),
    Variant("all-layer-loss-local", "the all-layer loss with the gradient stopped between layers", "18.2",
            dict(loss="all_layers_local")),
    Variant("early-exit", "the confidence / stochastic early-exit loss, its uniform draws an input", "18.3",
            dict(loss="early_exit")),
    Variant("padded-vocab", "wte and the logits padded to a multiple of 64 rows (nanoGPT's 50304)", "19",
            dict(vocab_multiple=64)),
    Variant("seed002-axm", "seed 002's best run: shared block, h + attn * mlp, attention without values (summed), "
            "parameter-free LayerNorm", "16-17", dict(blocks="shared", block_form="multiplicative",
                                                      attention_values="identity", head_reduce="sum",
                                                      norm="layernorm_noaffine")),
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
        if all(getattr(named, o) == getattr(spec, o) for o in OPTIONS) and (
                named.vocab_multiple == spec.vocab_multiple):
            return v.name
    return "custom"
