"""Seed 002's options in the reference, each checked against a construction that does not use it:
shared blocks against independent copies, the all-layer and early-exit losses against truncated
models' logits, vocabulary padding against the unpadded model, the residual statistics against
Hugging Face's hidden states. (Finite differences check every backward: tests/test_reference.py;
the backends meet the reference in the conformance suite.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

from gptspec.cli import main
from gptspec.spec import IGNORE_INDEX, InputError, ModelSpec, param_table, reference
from gptspec.weights import save, synthetic_params, write_hf

from helpers import params64 as params

MINI = ModelSpec(vocab_size=23, n_positions=8, n_embd=12, n_head=3, n_layer=3)


def inputs(spec, B=2, T=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, spec.vocab_size, (B, T)), rng.integers(0, spec.vocab_size, (B, T))
    targets[0, 2] = IGNORE_INDEX
    return tokens, targets


def truncated(spec, p, layers):
    """The model of the first `layers` blocks of `p`, with the same ln_f and head."""
    spec_l = spec.replace(n_layer=layers, loss="final")
    return spec_l, {n: p[n] for n in (i.name for i in param_table(spec_l))}


def ce(logits, targets):
    counted = targets != IGNORE_INDEX
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.where(counted, targets, 0)[..., None], -1)[..., 0][counted].mean()


@pytest.mark.variant("shared-blocks")
def test_shared_block_is_independent_copies_with_summed_gradients():
    shared = MINI.replace(blocks="shared")
    p = params(shared)
    copies = dict(p)
    for i in range(1, MINI.n_layer):
        copies.update({n.replace("h.0.", f"h.{i}.", 1): v for n, v in p.items() if n.startswith("h.0.")})
    tokens, targets = inputs(MINI)
    a, b = reference.loss_and_grads(shared, p, tokens, targets), reference.loss_and_grads(MINI, copies, tokens, targets)
    assert a.loss == pytest.approx(b.loss, rel=1e-13)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-12, atol=1e-14)
    for name in p:
        if name.startswith("h.0."):
            total = sum(b.grads[name.replace("h.0.", f"h.{i}.", 1)] for i in range(MINI.n_layer))
            np.testing.assert_allclose(a.grads[name], total, rtol=1e-10, atol=1e-14)
    assert [i.name for i in param_table(shared) if i.name.startswith("h.1")] == []


@pytest.mark.parametrize("loss", [pytest.param("all_layers", marks=pytest.mark.variant("all-layer-loss")),
                                  pytest.param("all_layers_local", marks=pytest.mark.variant("all-layer-loss-local"))])
def test_all_layer_loss_is_the_sum_of_the_truncated_models_losses(loss):
    spec = MINI.replace(loss=loss)
    p = params(spec)
    tokens, targets = inputs(spec)
    want = sum(ce(reference.forward(*truncated(spec, p, l), tokens), targets) for l in range(1, 4))
    assert reference.loss(spec, p, tokens, targets) == pytest.approx(want, rel=1e-12)
    # the model's logits are the last layer's whatever the loss
    np.testing.assert_array_equal(reference.forward(spec, p, tokens), reference.forward(MINI, p, tokens))


@pytest.mark.variant("early-exit")
def test_early_exit_loss_by_hand():
    spec = MINI.replace(n_layer=2, loss="early_exit")
    p = params(spec)
    tokens, targets = inputs(spec)
    counted = targets != IGNORE_INDEX
    z1, z2 = (reference.forward(*truncated(spec, p, l), tokens) for l in (1, 2))

    def terms(z):
        pmax = np.exp(z.max(-1) - np.log(np.exp(z).sum(-1)))
        xe = -np.log(np.take_along_axis(np.exp(z) / np.exp(z).sum(-1, keepdims=True),
                                        np.where(counted, targets, 0)[..., None], -1)[..., 0])
        return pmax, -np.log(1 - pmax), xe

    p1, conf1, xe1 = terms(z1)
    _, conf2, xe2 = terms(z2)
    u = np.where(np.arange(7) % 2 == 0, 0.5 * p1, np.minimum(2 * p1, 0.999))[None].repeat(2, 0)  # exit at evens
    exits = u[0] < p1
    per = np.where(exits, xe1 * conf1, conf1 + xe2 * conf2)
    want = per[counted].sum() / counted.sum()
    assert exits.any() and not exits.all()
    assert reference.loss(spec, p, tokens, targets, u) == pytest.approx(want, rel=1e-12)
    # one layer: every position exits there
    one = spec.replace(n_layer=1)
    value = reference.loss(one, truncated(spec, p, 1)[1], tokens, targets, np.full((1, 2, 7), 0.9))
    assert value == pytest.approx((xe1 * conf1)[counted].mean(), rel=1e-12)


@pytest.mark.variant("early-exit")
@pytest.mark.parametrize("draws, message", [
    (None, r"needs its draws u: an array of shape \(2, 2, 7\)"),
    (np.zeros((2, 2, 6)), r"draws must have shape \(n_layer, B, T\) = \(2, 2, 7\), got \(2, 2, 6\)"),
    (np.ones((2, 2, 7)), r"draws must lie in \[0, 1\)"),
    (np.full((2, 2, 7), np.nan), r"draws must lie in \[0, 1\)"),
    (np.zeros((2, 2, 7), dtype=np.int64), "floating-point"),
])
def test_bad_draws_are_named(draws, message):
    spec = MINI.replace(n_layer=2, loss="early_exit")
    tokens, targets = inputs(spec)
    with pytest.raises(InputError, match=message):
        reference.loss_and_grads(spec, params(spec), tokens, targets, draws)


@pytest.mark.variant("early-exit")
def test_draws_for_a_loss_without_them_are_refused():
    tokens, targets = inputs(MINI)
    with pytest.raises(InputError, match="draws are an input of loss='early_exit' only"):
        reference.loss(MINI, params(MINI), tokens, targets, np.zeros((3, 2, 7)))


@pytest.mark.variant("padded-vocab")
def test_padding_is_a_layout_not_a_model_change():
    padded = MINI.replace(vocab_multiple=16)
    assert padded.padded_vocab_size == 32 and dict(param_table(padded)[0].__dict__)["shape"] == (32, 12)
    p = params(MINI)
    pp = dict(p, **{"wte.weight": np.concatenate([p["wte.weight"], np.random.default_rng(1).normal(size=(9, 12))])})
    tokens, targets = inputs(MINI)
    a, b = reference.loss_and_grads(MINI, p, tokens, targets), reference.loss_and_grads(padded, pp, tokens, targets)
    assert b.logits.shape == (2, 7, 32)
    np.testing.assert_allclose(b.logits[..., :23], a.logits, rtol=1e-13, atol=1e-15)
    assert b.loss == pytest.approx(a.loss, rel=1e-13)
    np.testing.assert_allclose(b.grads["wte.weight"][:23], a.grads["wte.weight"], rtol=1e-12, atol=1e-15)
    assert not b.grads["wte.weight"][23:].any()  # padded rows: exactly zero
    for name in a.grads:
        if name != "wte.weight":
            np.testing.assert_allclose(b.grads[name], a.grads[name], rtol=1e-12, atol=1e-15)


@pytest.mark.variant("padded-vocab")
def test_padded_ids_are_not_inputs():
    padded = MINI.replace(vocab_multiple=16)
    with pytest.raises(InputError, match=r"outside the vocabulary \[0, 23\)"):
        reference.forward(padded, params(padded), np.array([[25]]))


def test_residual_stats_are_hugging_faces_hidden_states(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    spec = MINI
    p = params(spec, 3)
    write_hf(tmp_path / "hf", spec, {k: v.astype(np.float32) for k, v in p.items()})
    model = transformers.GPT2Model.from_pretrained(tmp_path / "hf", torch_dtype=torch.float64).eval()
    tokens = inputs(spec)[0]
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens), output_hidden_states=True).hidden_states  # h_0 .. h_{L-1}, ln_f(h_L)
    size = [float(h.std(-1).mean()) for h in hidden]  # torch's std: ddof=1
    stats = reference.residual_stats(spec, {k: v.astype(np.float32) for k, v in p.items()}, tokens)
    np.testing.assert_allclose(stats["input"], size[:-1], rtol=1e-6)
    np.testing.assert_allclose(stats["output"][:-1], size[1:-1], rtol=1e-6)
    assert stats["normed"][-1] == pytest.approx(size[-1], rel=1e-6)


@pytest.mark.variant("layernorm-noaffine")
def test_parameter_free_layernorm_gives_the_seeds_1_000651():
    spec = ModelSpec(vocab_size=11, n_positions=4, n_embd=768, n_head=12, n_layer=1, norm="layernorm_noaffine")
    p = synthetic_params(spec, 0, "gpt2")
    p = dict(p, **{"wte.weight": p["wte.weight"] * 100})  # a stream much larger than eps, as after training
    stats = reference.residual_stats(spec, p, np.array([[1, 2, 3]]))
    assert stats["normed"][0] == pytest.approx(math.sqrt(768 / 767), abs=2e-6)  # 1.000651
    assert stats["mid"][0] != stats["input"][0] != stats["output"][0]


@pytest.mark.variant("layernorm-noaffine")
def test_stats_command_prints_every_layer(tmp_path, capsys):
    spec = MINI.replace(norm="layernorm_noaffine")
    save(tmp_path / "m.safetensors", spec, synthetic_params(spec, 0, "gpt2"), synthetic=True)
    assert main(["stats", "--model", str(tmp_path / "m.safetensors"), "--ids", "1,2,3,4",
                 "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "SIZE COMPARISON" in out and "normed" in out and "SYNTHETIC" in out
    import json

    got = json.loads((tmp_path / "s.json").read_text())
    want = reference.residual_stats(spec, synthetic_params(spec, 0, "gpt2"), np.array([[1, 2, 3, 4]]))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
    assert main(["stats", "--model", str(tmp_path / "m.safetensors"), "--ids", "1,99"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().out
