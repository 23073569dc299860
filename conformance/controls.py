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
    # a half-precision bug that no end-to-end check can resolve, and why (SPEC.md 9, with the numbers): such a
    # control is run and reported, and its not being flagged is not a miss
    unresolvable: str = ""
    # the presets a half-precision control runs on (half_cases): where the bug is within the dtype's resolution
    half_presets: tuple[str, ...] = ("test-mini",)
    # where `unresolvable` holds, as (dtype, case id prefix) pairs; empty: in every half dtype and case
    unresolvable_where: tuple[tuple[str, str], ...] = ()

    def resolves(self, dtype: str, case: Case) -> bool:
        """Whether the bug must be flagged in `dtype` on `case` (SPEC.md 9): not where it is documented unresolvable."""
        if dtype == "float32" or not self.unresolvable:
            return True
        return bool(self.unresolvable_where) and not any(
            dtype == d and case.id.startswith(prefix) for d, prefix in self.unresolvable_where)

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


# -- half-precision bugs: arithmetic the spec keeps in float32 done in the model's dtype (SPEC.md 7) ----
def loss_in_model_dtype(model):
    # the cross-entropy in the model's dtype, as a kernel in the storage type computes it: the log-sum-exp's
    # exponentials added one at a time in the dtype, and the mean over positions likewise (MLX's CPU
    # reductions add one term at a time; torch's accumulate a half dtype in float32)
    import torch

    whole = model.loss_and_logits

    def loss_and_logits(tokens, targets, draws=None):
        _, logits = whole(tokens, targets, draws)
        z = logits[..., :model.spec.vocab_size]
        m = z.amax(-1, keepdim=True)
        lse = (m + torch.log(_accumulated(torch.exp(z - m)))).squeeze(-1)
        counted = targets != IGNORE_INDEX
        xe = torch.where(counted, lse - z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0)
        return _accumulated(xe.flatten()).squeeze() / counted.sum(), logits

    model.loss_and_logits = loss_and_logits


def _manual_attention(scores, probabilities):
    """An attention forward computing q k^T, the scale and the softmax by hand: `scores(q, k, scale)` and
    `probabilities(s)` are where each half-precision bug goes."""
    import torch

    def forward(self, x, cache=None):
        B, T, C = x.shape
        H = self.n_head
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        s = scores(q, k, 1.0 / math.sqrt(C // H))
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = probabilities(s).to(v.dtype) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
    return forward


def _set_attention(model, forward):
    for block in model.h:
        block.attn.forward = types.MethodType(forward, block.attn)


def _accumulated(x, dim=-1):
    """The sum over `dim` added one term at a time in x's dtype, each partial sum rounded (torch's own sum
    accumulates a half dtype in float32 and rounds once)."""
    import torch

    x = x.movedim(dim, -1)
    total = torch.zeros_like(x[..., 0])
    for i in range(x.shape[-1]):
        total = total + x[..., i]
    return total.unsqueeze(-1).movedim(-1, dim)


def softmax_in_model_dtype(model):
    # the scores in float32, but the softmax in the model's dtype, as a kernel in the storage type computes
    # it: the exponentials rounded, their sum accumulated in the dtype, the quotient rounded
    import torch

    def probabilities(s):
        s = s.to(model.wte.weight.dtype)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return e / _accumulated(e)

    _set_attention(model, _manual_attention(lambda q, k, scale: (q.float() @ k.float().transpose(-1, -2)) * scale,
                                            probabilities))


def scale_after_rounding_scores(model):
    # q k^T rounded to the model's dtype, then scaled (a second rounding), then a float32 softmax
    import torch

    _set_attention(model, _manual_attention(lambda q, k, scale: (q @ k.transpose(-1, -2)) * scale,
                                            lambda s: torch.softmax(s.float(), -1)))


def layer_norm_accumulated_in_model_dtype(model):
    # a hand-written LayerNorm whose mean and variance add the channels one at a time in the model's dtype
    # (a kernel accumulating in its storage type), where torch's accumulates in float32
    import torch
    import torch.nn as nn

    def norm(m):
        def forward(x):
            C = x.shape[-1]
            xc = x - _accumulated(x) / C
            y = xc * torch.rsqrt(_accumulated(xc * xc) / C + m.eps)
            return y if m.weight is None else y * m.weight + (0 if m.bias is None else m.bias)
        return forward

    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = norm(m)


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


#: half-precision bugs (SPEC.md 7 keeps the softmax, the loss and the norms' statistics in float32): each is
#: float32 arithmetic moved into the model's dtype, so in float32 it changes nothing but summation order
HALF_CONTROLS = (
    Control("loss-in-model-dtype", model=loss_in_model_dtype, unresolvable_where=(("float16", "trained:"),),
            unresolvable=(
        "in float16 (3 more bits than bfloat16) on the trained weights, whose log-sum-exp is dominated by a few "
        "terms, the running float16 sum stays within the loss bound; flagged at 5.5x on the synthetic weights and "
        "at 3.4x / 6.6x in bfloat16")),
    Control("layernorm-accumulated-in-model-dtype", model=layer_norm_accumulated_in_model_dtype,
            half_presets=("gpt2",)),  # a running bfloat16 sum of 64 channels loses little; of 768, much
    Control("softmax-in-model-dtype", model=softmax_in_model_dtype, unresolvable=(
        "the exponentials, their running sum over T <= 64 keys and the quotient rounded to the dtype are a few "
        "roundings of the attention probabilities, which the attention output already carries from its values "
        "stored in the dtype: 0.31x / 0.17x / 0.27x of the bound (test-mini, trained, gpt2 B1xT64) against the "
        "correct model's 0.31x / 0.31x / 0.22x")),
    Control("scale-after-rounding-scores", model=scale_after_rounding_scores, unresolvable=(
        "one more rounding of each score q.k, relative to the score, where the score already carries the "
        "rounding of q and k (at least as large, with the same relative size): 0.25x / 0.17x of the bound "
        "(test-mini, trained) against the correct model's 0.31x / 0.31x")),
)


#: the dtypes each half-precision control runs in, on these cases: a small synthetic config and the trained
#: checkpoint, whose peaked attention and logits of several units are where such bugs grow
HALF_DTYPES = ("bfloat16", "float16")


def half_cases(control: Control | None = None) -> tuple[Case, ...]:
    """The cases a half-precision control runs on (all of them without one): test-mini's synthetic and trained
    weights, and the full gpt2 shapes for a bug that needs gpt2's width to show."""
    from .trained import trained_cases

    every = (GPT2_CASES[0], *trained_cases("default"), GPT2_CASES[1])
    return tuple(c for c in every if control is None or c.preset in control.half_presets)


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
    dtype: str = "float32"
    # in a half dtype, for a bug that exists in float32 too: its effect (the float32 model's error, where
    # rounding is negligible) over the half dtype's bound, at the tensor where that is largest (SPEC.md 9)
    effect_ratio: float = math.nan
    unresolvable: str = ""  # the control's documented reason, where it has one

    @property
    def resolvable(self) -> bool:
        """Whether the dtype can see the bug: always for float32 and the half-precision bugs; for another bug
        in a half dtype, when its effect is at least twice the dtype's bound somewhere (below half of it, the
        bug is under the dtype's resolution; in between it may or may not show)."""
        return math.isnan(self.effect_ratio) or self.effect_ratio >= 2

    @property
    def verdict(self) -> str:
        if self.flagged:
            return "flagged"
        if self.unresolvable:
            return "below resolution"
        if math.isnan(self.effect_ratio) or self.effect_ratio >= 2:
            return "MISSED"
        return "below resolution" if self.effect_ratio < 0.5 else "marginal"

    @property
    def ok(self) -> bool:
        return self.correct_ok and self.verdict != "MISSED"


def control_case(control: Control, case: Case | None = None) -> Case:
    """The case a variant control runs on: test-mini of its variant."""
    return case or Case("test-mini", 0, batch=2, length=48, variant=control.variant)


def run_control(control: Control, case: Case, on_start=None, dtype: str = "float32") -> ControlResult:
    """The control and the correct torch model, through the same checks on one case (cpu)."""
    from ..backends.torch.backend import TorchBackend
    from .runner import run_case

    right, wrong = run_case([TorchBackend(), control.backend()], case, dtype, "cpu", pairwise=False,
                            on_start=on_start)
    effect = math.nan
    if dtype != "float32" and control not in HALF_CONTROLS:
        effect = effect_ratio(control, case, dtype, on_start)
    numeric = [c for c in wrong.failures if not c.note]
    worst = max(numeric, key=lambda c: c.worst_ratio, default=None)
    return ControlResult(
        control.name, control.variant, case.id, flagged=bool(numeric) and not wrong.ok,
        worst_ratio=worst.worst_ratio if worst else (math.nan if wrong.status != "ran" else 0.0),
        worst_tensor=worst.tensor if worst else "", correct_ok=right.ok,
        message=wrong.message if wrong.status != "ran" else "", dtype=dtype, effect_ratio=effect,
        unresolvable="" if control.resolves(dtype, case) else control.unresolvable)


def effect_ratio(control: Control, case: Case, dtype: str, on_start=None) -> float:
    """How far the bug's effect reaches beyond `dtype`'s bounds: its error in float32 (the bug's own size,
    float32 rounding being far below it) over the bound `dtype` gives the same tensor, at the largest."""
    from ..spec.tolerance import conditioned_bound, effective_kappa, is_conditioned
    from .runner import conditioning, run_case

    (f32,) = run_case([control.backend()], case, "float32", "cpu", pairwise=False, on_start=on_start)
    kappa = conditioning(case)
    ratios = [c.rel_l2 / b for c in f32.checks if not c.note and c.tensor in kappa
              for b in [conditioned_bound(dtype, c.quantity, "rel_l2", effective_kappa(dtype, "rel_l2", kappa[c.tensor]))
                        if is_conditioned() else None] if b]
    return max(ratios, default=math.inf)


def selected(variants: Iterable[str] | None = None, presets: Iterable[str] | None = None,
             dtype: str = "float32") -> list[tuple[Control, Case]]:
    """(control, case) pairs of a dtype: GPT-2's controls on GPT2_CASES, each variant's on its test-mini model,
    and in a half dtype the half-precision controls on half_cases(); `variants` and `presets` narrow the
    selection (None: all)."""
    variants, presets = (None if v is None else set(v) for v in (variants, presets))
    pairs = [(c, case) for c in CONTROLS for case in GPT2_CASES]
    pairs += [(c, control_case(c)) for c in VARIANT_CONTROLS]
    if dtype in HALF_DTYPES:
        pairs += [(c, case) for c in HALF_CONTROLS for case in half_cases(c)]
    return [(c, case) for c, case in pairs
            if (variants is None or c.variant in variants) and (presets is None or case.preset in presets)]


def run_controls(variants: Iterable[str] | None = None, cases: Iterable[str] | None = None,
                 on_result: Callable[[ControlResult], None] | None = None, on_start=None,
                 dtype: str = "float32") -> list[ControlResult]:
    """Every selected control (see `selected`; `cases` names presets) in `dtype`, each result to `on_result`."""
    results = []
    for control, case in selected(variants, cases, dtype):
        result = run_control(control, case, on_start, dtype)
        results.append(result)
        if on_result:
            on_result(result)
    return results


def table(results: Iterable[ControlResult]):
    """A rich Table: each control, its case, its worst error/bound ratio and whether it was flagged."""
    from rich.table import Table

    t = Table(title="gptspec negative controls (torch): each bug must be flagged, the correct model pass")
    for col in ("control", "variant", "case", "dtype", "worst error / bound", "tensor", "effect / bound", "verdict",
                "correct model"):
        t.add_column(col, justify="right" if "/" in col else "left")
    for r in results:
        ratio = "-" if math.isnan(r.worst_ratio) else "inf" if math.isinf(r.worst_ratio) else f"{r.worst_ratio:.3g}"
        effect = "-" if math.isnan(r.effect_ratio) else f"{r.effect_ratio:.3g}"
        color = {"flagged": "green", "MISSED": "red"}.get(r.verdict, "yellow")
        t.add_row(r.name, r.variant, r.case, r.dtype, ratio, r.worst_tensor or r.message[:40], effect,
                  f"[{color}]{r.verdict}[/{color}]",
                  "[green]passes[/green]" if r.correct_ok else "[red]fails[/red]")
    return t
