"""Negative controls: deliberately broken torch models that the suite must flag (SPEC.md 9).

A suite that cannot fail proves nothing. Each control is one realistic bug, injected into an
otherwise correct torch backend and run through `run_case` exactly as a real backend is: it must
produce at least one numeric failure (an error beyond its bound, not just a missing name), while
the correct model passes the same checks. `gptspec conformance controls` prints each control's
worst error/bound ratio, the number SPEC.md 9 quotes; tests/test_negative_controls.py asserts it.

The seam, documented so that a new control needs no knowledge of the model's private state. A
`Control` breaks the torch backend at one of three points:

- `weights(spec, params) -> params`: the canonical parameters the model is given (a loader's bug);
- `spec`: field values the model is built from, while the reference computes the case's true spec
  (the model computes as if the spec said something else: another block form, constant, reduction,
  loss or vocabulary);
- `model(module)`: the built nn.Module, through torch's public interface (a submodule's `forward`,
  a norm's `eps`, a Linear's `bias`, a method of the model), never a private attribute.
"""
from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from ..spec import IGNORE_INDEX, param_table
from .cases import Case

# the cases every GPT-2 control runs on: a small config and the full gpt2 shapes (SPEC.md 9)
GPT2_CASES = (Case("test-mini", 0, batch=2, length=48), Case("gpt2", 0, batch=1, length=64))


@dataclass(frozen=True)
class Control:
    name: str
    variant: str = "gpt2"                  # the variant whose model is broken (spec/variants.py)
    weights: Callable | None = None        # (spec, params) -> params
    spec: dict[str, Any] = field(default_factory=dict)
    model: Callable | None = None          # (torch module) -> None, in place

    def backend(self):
        """The torch backend with this control's bug."""
        from ..backends.torch.backend import TorchBackend

        control = self

        class Broken(TorchBackend):
            name = f"torch[{control.name}]"

            def build(self, spec, params, dtype="float32", device=None):
                if control.weights:
                    params = control.weights(spec, dict(params))
                model = super().build(spec.replace(**control.spec), params, dtype, device)
                if control.model:
                    control.model(model)
                return model

        return Broken()


# -- bugs in the built model ------------------------------------------------------------------------
def exact_erf_gelu(model):
    import torch.nn.functional as F

    for block in model.h:
        block.mlp.forward = types.MethodType(lambda self, x: self.c_proj(F.gelu(self.c_fc(x))), block.mlp)


def layer_norm_eps_1e_6(model):
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6


def attention_scale_1_over_d(model):
    import torch.nn.functional as F

    def forward(self, x):
        B, T, C = x.shape
        H = model.spec.n_head
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=H / C)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    for block in model.h:
        block.attn.forward = types.MethodType(forward, block.attn)


def untied_head(model):
    # a separate head starting from a copy of wte: same logits, but wte misses the head's gradient
    import torch.nn as nn

    model.lm_head = nn.Linear(model.spec.n_embd, model.spec.vocab_size, bias=False)
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    model.head = types.MethodType(lambda self, x: self.lm_head(self.ln_f(x)), model)


def dropped_biases(model):
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.bias = None


def rmsnorm_default_eps(model):
    # nn.RMSNorm(C) without eps: torch then uses finfo(dtype).eps (1.2e-7 in float32), not the spec's 1e-5
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.RMSNorm):
            m.eps = None


def _rms(eps: float, gain=None):
    import torch

    def forward(x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if gain is None else gain * y
    return forward


def noaffine_layernorm_as_rmsnorm(model):
    # the parameter-free LayerNorm computed without subtracting the mean
    for block in model.h:
        block.ln_1.forward, block.ln_2.forward = _rms(block.ln_1.eps), _rms(block.ln_2.eps)
    model.ln_f.forward = _rms(model.ln_f.eps)


def no_bias_layernorm_without_centering(model):
    # a hand-written bias-free LayerNorm that forgets to subtract the mean (an RMSNorm with a gain)
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = _rms(m.eps, m.weight)


def shared_block_copied(model):
    # the shared block deep-copied per layer: the same forward, but h.0 gets only layer 0's gradient
    import torch.nn as nn

    model.h = nn.ModuleList([model.h[0]] + [copy.deepcopy(model.h[0]) for _ in range(model.spec.n_layer - 1)])


def layer_losses_averaged(model):
    # the all-layer loss divided by the number of layers (the seed sums them)
    whole = model.loss_and_logits

    def loss_and_logits(tokens, targets, draws=None):
        value, logits = whole(tokens, targets, draws)
        return value / model.spec.n_layer, logits

    model.loss_and_logits = loss_and_logits


def early_exit_xe_at_every_layer(model):
    # seed 002's earlier "3-test": the cross-entropy weighs every active layer, not just the exit layer
    import torch

    def loss_and_logits(tokens, targets, draws=None):
        x, counted = model.embed(tokens), targets != IGNORE_INDEX
        active, total, layers = torch.ones_like(counted), 0.0, model.layers()
        for i, block in enumerate(layers):
            x = block(x)
            z = model.head(x).float()
            lse = z.logsumexp(-1)
            p_max = torch.exp(z.amax(-1) - lse)
            xe = lse - z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total = total + (xe * -torch.log1p(-p_max))[active & counted].sum()
            exits = draws[i] < p_max.detach() if i < len(layers) - 1 else torch.ones_like(counted)
            active = active & ~exits
        return total / counted.sum(), model.head(x)

    model.loss_and_logits = loss_and_logits


def stats_without_bessel(model):
    # the residual statistics with the population std (ddof=0) instead of the seed's Bessel-corrected one
    import torch

    def residual_stats(tokens):
        x, rows = model.embed(tokens), []
        with torch.no_grad():
            for block in model.layers():
                out, mid = block.streams(x)
                rows.append(torch.stack([t.std(-1, correction=0).mean() for t in (x, mid, out, model.ln_f(out))]))
                x = out
        return dict(zip(("input", "mid", "output", "normed"), torch.stack(rows).T))

    model.residual_stats = residual_stats


def ngpt_normalize_wrong_axis(model):
    import torch

    @torch.no_grad()
    def normalize_():
        params = dict(model.named_parameters())
        for info in param_table(model.spec):
            if info.unit_norm_axis is not None:
                w = params[info.name]
                w.copy_(w / w.norm(dim=1 - info.unit_norm_axis, keepdim=True))

    model.normalize_ = normalize_


def ngpt_inverse_sqrt_dk_scale(model):
    import torch.nn.functional as F

    from ..backends.torch.ngpt import justnorm, rope

    def forward(self, x, cos_sin):
        B, T, C = x.shape
        H = model.spec.n_head
        D = C // H
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        sqk = (self.sqk * self.sqk_scale).view(1, H, 1, D)
        y = F.scaled_dot_product_attention(sqk * justnorm(q), sqk * justnorm(k), v, is_causal=True)  # 1/sqrt(D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    for block in model.h:
        block.attn.forward = types.MethodType(forward, block.attn)


# -- a bug in the weights ---------------------------------------------------------------------------
def conv1d_left_untransposed(spec, params):
    # what a Hugging Face loader that forgets the Conv1D transpose produces: the square weights
    # (attn.c_proj) load without a shape error, transposed
    for p in param_table(spec):
        if p.hf_transposed and p.shape[0] == p.shape[1]:
            params[p.name] = np.ascontiguousarray(params[p.name].T)
    return params


#: GPT-2's controls, each run on GPT2_CASES
CONTROLS = (
    Control("exact-erf-gelu", model=exact_erf_gelu),
    Control("layernorm-eps-1e-6", model=layer_norm_eps_1e_6),
    Control("attention-scale-1/d", model=attention_scale_1_over_d),
    Control("untied-head", model=untied_head),
    Control("dropped-biases", model=dropped_biases),
    Control("conv1d-untransposed", weights=conv1d_left_untransposed),
)

#: each variant's controls, run on that variant's test-mini model
VARIANT_CONTROLS = (
    Control("softmax1-as-softmax", "softmax1", spec=dict(attention="softmax")),
    Control("softmax_c-as-softmax", "softmax_c", spec=dict(attention="softmax", softmax_c=1.0)),
    Control("rmsnorm-default-eps", "rmsnorm", model=rmsnorm_default_eps),
    Control("noaffine-layernorm-as-rmsnorm", "layernorm-noaffine", model=noaffine_layernorm_as_rmsnorm),
    Control("no-bias-layernorm-without-centering", "no-bias", model=no_bias_layernorm_without_centering),
    Control("shared-block-copied-per-layer", "shared-blocks", model=shared_block_copied),
    Control("parallel-c_a-ignored", "parallel", spec=dict(parallel_attn_scale=1.0)),
    Control("multiplicative-as-parallel", "multiplicative", spec=dict(block_form="parallel")),
    Control("normed-residual-as-sequential", "normed-residual", spec=dict(block_form="sequential")),
    Control("escape-normed-as-escape-residual", "escape-normed", spec=dict(block_form="escape_residual")),
    Control("escape-residual-as-sequential", "escape-residual", spec=dict(block_form="sequential")),
    Control("no-value-heads-summed", "no-value", spec=dict(head_reduce="sum")),
    Control("no-value-sum-heads-averaged", "no-value-sum", spec=dict(head_reduce="mean")),
    Control("all-layer-loss-averaged", "all-layer-loss", model=layer_losses_averaged),
    Control("stop-gradient-forgotten", "all-layer-loss-local", spec=dict(loss="all_layers")),
    Control("early-exit-xe-at-every-layer", "early-exit", model=early_exit_xe_at_every_layer),
    Control("padded-logits-in-the-loss", "padded-vocab", spec=dict(vocab_size=320, vocab_multiple=1)),
    Control("residual-stats-without-bessel", "gpt2", model=stats_without_bessel),
    Control("ngpt-normalize-wrong-axis", "ngpt", model=ngpt_normalize_wrong_axis),
    Control("ngpt-scale-1/sqrt(dk)", "ngpt", model=ngpt_inverse_sqrt_dk_scale),
    Control("ngpt-seed-scale-1/sqrt(dk)", "ngpt-seed", model=ngpt_inverse_sqrt_dk_scale),
)


@dataclass
class ControlResult:
    name: str
    variant: str
    case: str
    flagged: bool          # at least one numeric failure (not only a note such as a missing tensor)
    worst_ratio: float     # the largest error/bound of a numeric check (inf: NaN or Inf)
    worst_tensor: str
    correct_ok: bool       # the correct torch model passed the same checks
    message: str = ""      # an error instead of a run

    @property
    def ok(self) -> bool:
        return self.flagged and self.correct_ok


def control_case(control: Control, case: Case | None = None) -> Case:
    """The case a variant control runs on: test-mini of its variant."""
    return case or Case("test-mini", 0, batch=2, length=48, variant=control.variant)


def run_control(control: Control, case: Case, on_start=None) -> ControlResult:
    """The control and the correct torch model, through the same checks on one case (float32, cpu)."""
    from ..backends.torch.backend import TorchBackend
    from .runner import run_case

    right, wrong = run_case([TorchBackend(), control.backend()], case, "float32", "cpu", pairwise=False,
                            on_start=on_start)
    numeric = [c for c in wrong.failures if not c.note]
    worst = max(numeric, key=lambda c: c.worst_ratio, default=None)
    return ControlResult(
        control.name, control.variant, case.id, flagged=bool(numeric) and not wrong.ok,
        worst_ratio=worst.worst_ratio if worst else (math.nan if wrong.status != "ran" else 0.0),
        worst_tensor=worst.tensor if worst else "", correct_ok=right.ok,
        message=wrong.message if wrong.status != "ran" else "")


def selected(variants: Iterable[str] | None = None, presets: Iterable[str] | None = None) -> list[tuple[Control, Case]]:
    """(control, case) pairs: GPT-2's controls on GPT2_CASES, each variant's on its test-mini model;
    `variants` and `presets` narrow the selection (None: all)."""
    variants, presets = (None if v is None else set(v) for v in (variants, presets))
    pairs = [(c, case) for c in CONTROLS for case in GPT2_CASES]
    pairs += [(c, control_case(c)) for c in VARIANT_CONTROLS]
    return [(c, case) for c, case in pairs
            if (variants is None or c.variant in variants) and (presets is None or case.preset in presets)]


def run_controls(variants: Iterable[str] | None = None, cases: Iterable[str] | None = None,
                 on_result: Callable[[ControlResult], None] | None = None, on_start=None) -> list[ControlResult]:
    """Every selected control (see `selected`; `cases` names presets), each result to `on_result` as it comes."""
    results = []
    for control, case in selected(variants, cases):
        result = run_control(control, case, on_start)
        results.append(result)
        if on_result:
            on_result(result)
    return results


def table(results: Iterable[ControlResult]):
    """A rich Table: each control, its case, its worst error/bound ratio and whether it was flagged."""
    from rich.table import Table

    t = Table(title="gptspec negative controls (float32, torch): each bug must be flagged, the correct model pass")
    for col in ("control", "variant", "case", "worst error / bound", "tensor", "flagged", "correct model"):
        t.add_column(col, justify="right" if col == "worst error / bound" else "left")
    for r in results:
        ratio = "-" if math.isnan(r.worst_ratio) else "inf" if math.isinf(r.worst_ratio) else f"{r.worst_ratio:.3g}"
        t.add_row(r.name, r.variant, r.case, ratio, r.worst_tensor or r.message[:40],
                  "[green]yes[/green]" if r.flagged else "[red]NO[/red]",
                  "[green]passes[/green]" if r.correct_ok else "[red]fails[/red]")
    return t
