"""The trained conformance case (conformance/trained.py): the shipped checkpoint is small, float32, trained
and says how it was made; its inputs are the slice's validation text; its weights are sharper than the
synthetic ones (peaked attention, larger logits, outliers); it is in the suite's tiers and passes there."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gptspec.conformance import cases, run_case
from gptspec.conformance.cases import Case
from gptspec.conformance.generation import generation_cases
from gptspec.conformance.trained import REGENERATE, TRAINED_FILE, TrainedCase, sharpness, trained_cases
from gptspec.data import TokenShards
from gptspec.data.prepare import prepare
from gptspec.spec import ModelSpec, WeightsError, reference
from gptspec.weights import load_checkpoint, synthetic_params


@pytest.fixture(scope="module")
def case() -> TrainedCase:
    (c,) = trained_cases("default")
    return c


def test_the_shipped_checkpoint_is_small_float32_and_says_how_it_was_made():
    assert TRAINED_FILE.stat().st_size < 500_000
    ckpt = load_checkpoint(str(TRAINED_FILE))
    assert ckpt.stored_dtype == "float32" and not ckpt.synthetic
    assert ckpt.spec == ModelSpec.preset("test-mini")  # its 257 ids pad the slice's 65 characters
    assert REGENERATE in ckpt.metadata["origin"]


def test_its_inputs_are_the_slice_validation_text(case, tmp_path):
    """Against `gptspec data prepare`'s own shards of the slice: the first 2 x 49 validation ids, in the
    synthetic test-mini case's shape (so tinygrad reuses its kernels)."""
    prepare(["shakespeare-slice"], tmp_path / "shards", tokenizer="char")
    val = np.asarray(TokenShards.open(tmp_path / "shards").tokens("val")[: 2 * 49], np.int64).reshape(2, 49)
    tokens, targets = case.inputs(case.spec)
    assert tokens.shape == Case("test-mini", 0, batch=2, length=48).inputs(case.spec)[0].shape
    assert np.array_equal(tokens, val[:, :48])
    counted = targets != -100
    assert np.array_equal(targets[counted], val[:, 1:][counted]) and (~counted).sum() == len(range(3, 96, 7))


def test_the_weights_are_trained(case):
    """The float64 reference's loss on that text: far below uniform guessing (ln 65) and the init law."""
    ckpt = case.checkpoint()
    tokens, targets = case.inputs(ckpt.spec)
    trained = reference.loss(ckpt.spec, ckpt.params, tokens, targets)
    untrained = reference.loss(ckpt.spec, synthetic_params(ckpt.spec, 0, "gpt2"), tokens, targets)
    assert trained < 2.5 < math.log(65) - 0.1 < untrained


def test_sharpness_of_uniform_attention_is_uniform():
    """The measure's own oracle: zero query/key weights give every key the same weight 1/(t+1)."""
    spec = ModelSpec.preset("test-mini")
    params = synthetic_params(spec, 0, "gpt2")
    for i in range(spec.n_layer):
        params[f"h.{i}.attn.c_attn.weight"][:, : 2 * spec.n_embd] = 0
        params[f"h.{i}.attn.c_attn.bias"][: 2 * spec.n_embd] = 0
    T = 32
    s = sharpness(spec, params, np.arange(T)[None] % spec.vocab_size)
    assert s["attn_max"] == pytest.approx(np.mean([1 / (t + 1) for t in range(7, T)]), rel=1e-12)
    assert s["attn_entropy"] == pytest.approx(1.0, rel=1e-12)


def test_trained_weights_are_sharper_than_the_synthetic_cases(case):
    """Why the case is in the suite (docs/experiments.md): on the same shape, trained attention is more peaked,
    the logits larger and the residual stream's outliers larger than in the suite's synthetic test-mini case."""
    ckpt = case.checkpoint()
    trained = sharpness(ckpt.spec, ckpt.params, case.inputs(ckpt.spec)[0])
    synthetic = Case("test-mini", 0, batch=2, length=48)
    base = sharpness(synthetic.spec, synthetic.checkpoint().params, synthetic.inputs(synthetic.spec)[0])
    assert trained["attn_max"] > 1.3 * base["attn_max"]
    assert trained["attn_entropy"] < base["attn_entropy"] - 0.1
    assert trained["logit_std"] > 1.2 * base["logit_std"]
    assert trained["resid_outlier"] > 1.2 * base["resid_outlier"]


def test_the_trained_case_passes_against_the_reference(case):
    """torch in every dtype (test_conformance.py runs every backend and pair once the case is in the tier)."""
    from gptspec import backends

    if "torch" not in backends.available():
        pytest.skip("needs torch")
    for dtype in ("float32", "bfloat16", "float16"):
        (out,) = run_case([backends.get("torch")], case, dtype, pairwise=False)
        assert out.status == "ran" and out.ok, [f"{c.tensor}: {c.rel_l2:.2e}/{c.bound_l2:.0e}" for c in out.failures]


def test_the_case_is_in_the_default_tier_and_generation(case):
    suite = cases("default")
    assert [c.id for c in suite if isinstance(c, TrainedCase)] == ["trained:test-mini/shakespeare-char/B2xT48"], (
        "conformance/cases.py must add trained_cases(tier) (conformance/trained.py) to its tiers")
    assert case in generation_cases(suite)


def test_a_missing_checkpoint_says_how_to_make_it(monkeypatch, tmp_path):
    import gptspec.conformance.trained as trained

    monkeypatch.setattr(trained, "TRAINED_FILE", tmp_path / "gone.safetensors")
    with pytest.raises(WeightsError, match=f"gone.safetensors is missing; regenerate it with {REGENERATE}"):
        trained.trained_cases()
