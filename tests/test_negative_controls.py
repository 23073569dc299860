"""Negative controls: deliberately broken torch models must be flagged by the same checks.

Each control is one realistic bug, injected into an otherwise correct torch backend and run
through conformance.run_case exactly as a real backend is. A suite that cannot fail proves
nothing: every control must produce at least one numeric failure (an error beyond its bound,
not just a missing name), in float32, on small configs and on the full gpt2 shapes.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gptspec.backends.torch.backend import TorchBackend  # noqa: E402
from gptspec.conformance import Case, run_case  # noqa: E402
from gptspec.spec import param_table  # noqa: E402


class Broken(TorchBackend):
    """The torch backend with one bug: in the model it builds, or in the weights it is given."""

    def __init__(self, bug, break_model=None, break_weights=None):
        self.name = f"torch[{bug}]"
        self.break_model, self.break_weights = break_model, break_weights

    def build(self, spec, params, dtype="float32", device=None):
        if self.break_weights:
            params = self.break_weights(spec, dict(params))
        model = super().build(spec, params, dtype, device)
        if self.break_model:
            self.break_model(model)
        return model


def exact_erf_gelu(model):
    for block in model.h:
        block.mlp.forward = types.MethodType(lambda self, x: self.c_proj(F.gelu(self.c_fc(x))), block.mlp)


def layer_norm_eps_1e_6(model):
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6


def attention_scale_1_over_d(model):
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.n_head / C)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    for block in model.h:
        block.attn.forward = types.MethodType(forward, block.attn)


def untied_head(model):
    # a separate head starting from a copy of wte: same logits, but wte misses the head's gradient
    model.lm_head = nn.Linear(model.spec.n_embd, model.spec.vocab_size, bias=False)
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())

    model.head = types.MethodType(lambda self, x: self.lm_head(self.ln_f(x)), model)


def dropped_biases(model):
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.bias = None


def conv1d_left_untransposed(spec, params):
    # what a Hugging Face loader that forgets the Conv1D transpose produces: the square weights
    # (attn.c_proj) load without a shape error, transposed
    for p in param_table(spec):
        if p.hf_transposed and p.shape[0] == p.shape[1]:
            params[p.name] = np.ascontiguousarray(params[p.name].T)
    return params


def standard_softmax_for_sinks(model):
    # softmax1 configured, the plain softmax run: the sink is dropped
    for block in model.h:
        block.attn.sink_logit = None


def ngpt_normalize_wrong_axis(model):
    @torch.no_grad()
    def normalize_(self):
        params = dict(self.named_parameters())
        for info in param_table(self.spec):
            if info.unit_norm_axis is not None:
                w = params[info.name]
                w.copy_(w / w.norm(dim=1 - info.unit_norm_axis, keepdim=True))

    model.normalize_ = types.MethodType(normalize_, model)


def ngpt_inverse_sqrt_dk_scale(model):
    from gptspec.backends.torch.ngpt import justnorm, rope

    def forward(self, x, cos_sin):
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        sqk = (self.sqk * self.sqk_scale).view(1, H, 1, D)
        y = F.scaled_dot_product_attention(sqk * justnorm(q), sqk * justnorm(k), v, is_causal=True)  # 1/sqrt(D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    for block in model.h:
        block.attn.forward = types.MethodType(forward, block.attn)


CONTROLS = [
    Broken("exact-erf-gelu", exact_erf_gelu),
    Broken("layernorm-eps-1e-6", layer_norm_eps_1e_6),
    Broken("attention-scale-1/d", attention_scale_1_over_d),
    Broken("untied-head", untied_head),
    Broken("dropped-biases", dropped_biases),
    Broken("conv1d-untransposed", break_weights=conv1d_left_untransposed),
]
CASES = [Case("test-mini", 0, batch=2, length=48), Case("gpt2", 0, batch=1, length=64)]
def rmsnorm_default_eps(model):
    # nn.RMSNorm(C) without eps: torch then uses finfo(dtype).eps (1.2e-7 in float32), not the spec's 1e-5
    for m in model.modules():
        if isinstance(m, nn.RMSNorm):
            m.eps = None


def noaffine_layernorm_as_rmsnorm(model):
    # the parameter-free LayerNorm computed without subtracting the mean
    def rms(ln):
        return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps)

    for block in model.h:
        block.ln_1.forward, block.ln_2.forward = rms(block.ln_1), rms(block.ln_2)
    model.ln_f.forward = rms(model.ln_f)


def no_bias_layernorm_without_centering(model):
    # a hand-written bias-free LayerNorm that forgets to subtract the mean (an RMSNorm with a gain)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = (lambda ln: lambda x: ln.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps))(m)


def shared_block_copied(model):
    # the shared block deep-copied per layer: the same forward, but h.0 gets only layer 0's gradient
    import copy

    model.h = nn.ModuleList([model.h[0]] + [copy.deepcopy(model.h[0]) for _ in range(model.spec.n_layer - 1)])


def set_blocks(**attrs):
    def breaks(model):
        for block in model.h:
            for name, value in attrs.items():
                setattr(block, name, value)
    return breaks


def set_attention(**attrs):
    def breaks(model):
        for block in model.h:
            for name, value in attrs.items():
                setattr(block.attn, name, value)
    return breaks


def with_spec(**changes):
    # the model computes as if its spec had these values (e.g. the stop-gradient forgotten)
    def breaks(model):
        model.spec = model.spec.replace(**changes)
    return breaks


def layer_losses_averaged(model):
    # the all-layer loss divided by the number of layers (the seed sums them)
    whole = model.loss_and_logits

    def loss_and_logits(tokens, targets, draws=None):
        value, logits = whole(tokens, targets, draws)
        return value / model.spec.n_layer, logits

    model.loss_and_logits = loss_and_logits


def early_exit_xe_at_every_layer(model):
    # seed 002's earlier "3-test": the cross-entropy weighs every active layer, not just the exit layer
    from gptspec.backends.torch.model import IGNORE_INDEX

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
    def residual_stats(tokens):
        x, rows = model.embed(tokens), []
        with torch.no_grad():
            for block in model.layers():
                mid, out = block.streams(x)
                rows.append(torch.stack([t.std(-1, correction=0).mean() for t in (x, mid, out, model.ln_f(out))]))
                x = out
        return dict(zip(("input", "mid", "output", "normed"), torch.stack(rows).T))

    model.residual_stats = residual_stats


# (variant, bug): each variant's controls run on that variant's model
VARIANT_CONTROLS = [
    ("softmax1", Broken("softmax1-as-softmax", standard_softmax_for_sinks)),
    ("softmax_c", Broken("softmax_c-as-softmax", standard_softmax_for_sinks)),
    ("rmsnorm", Broken("rmsnorm-default-eps", rmsnorm_default_eps)),
    ("layernorm-noaffine", Broken("noaffine-layernorm-as-rmsnorm", noaffine_layernorm_as_rmsnorm)),
    ("no-bias", Broken("no-bias-layernorm-without-centering", no_bias_layernorm_without_centering)),
    ("shared-blocks", Broken("shared-block-copied-per-layer", shared_block_copied)),
    ("parallel", Broken("parallel-c_a-ignored", set_blocks(c_a=1.0))),
    ("multiplicative", Broken("multiplicative-as-parallel", set_blocks(form="parallel"))),
    ("normed-residual", Broken("normed-residual-as-sequential", set_blocks(form="sequential"))),
    ("escape-normed", Broken("escape-normed-as-escape-residual", set_blocks(form="escape_residual"))),
    ("escape-residual", Broken("escape-residual-as-sequential", set_blocks(form="sequential"))),
    ("no-value", Broken("no-value-heads-summed", set_attention(head_reduce="sum"))),
    ("no-value-sum", Broken("no-value-sum-heads-averaged", set_attention(head_reduce="mean"))),
    ("all-layer-loss", Broken("all-layer-loss-averaged", layer_losses_averaged)),
    ("all-layer-loss-local", Broken("stop-gradient-forgotten", with_spec(loss="all_layers"))),
    ("early-exit", Broken("early-exit-xe-at-every-layer", early_exit_xe_at_every_layer)),
    ("padded-vocab", Broken("padded-logits-in-the-loss", with_spec(vocab_size=320, vocab_multiple=1))),
    ("gpt2", Broken("residual-stats-without-bessel", stats_without_bessel)),
    ("ngpt", Broken("ngpt-normalize-wrong-axis", ngpt_normalize_wrong_axis)),
    ("ngpt", Broken("ngpt-scale-1/sqrt(dk)", ngpt_inverse_sqrt_dk_scale)),
    ("ngpt-seed", Broken("ngpt-seed-scale-1/sqrt(dk)", ngpt_inverse_sqrt_dk_scale)),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def control_outcomes(request):
    return {o.subject: o for o in run_case(CONTROLS, request.param, "float32", "cpu", pairwise=False)}


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: c.name)
def test_broken_model_is_flagged(control, control_outcomes):
    outcome = control_outcomes[control.name]
    assert outcome.status == "ran", outcome.message
    numeric = [c for c in outcome.failures if not c.note]
    assert numeric, f"{control.name} passed conformance: the suite cannot see this bug"
    assert not outcome.ok


@pytest.mark.parametrize("variant, control", VARIANT_CONTROLS, ids=lambda x: getattr(x, "name", x))
def test_broken_variant_is_flagged(variant, control):
    case = Case("test-mini", 0, batch=2, length=48, variant=variant)
    outcomes = run_case([TorchBackend(), control], case, "float32", "cpu", pairwise=False)
    right, wrong = outcomes
    assert right.ok, [c.tensor for c in right.failures]  # the same checks pass the correct model
    assert wrong.status == "ran", wrong.message
    assert [c for c in wrong.failures if not c.note], f"{control.name} passed: the suite cannot see this bug"


def test_correct_model_passes_the_same_checks():
    # the positive control: the harness above fails the bugs, not everything
    (outcome,) = run_case([TorchBackend()], CASES[0], "float32", "cpu", pairwise=False)
    assert outcome.ok, [c.tensor for c in outcome.failures]
