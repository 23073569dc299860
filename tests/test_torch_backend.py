"""What only the torch backend has: load() gives a plain torch.nn.Module, torch dtypes and devices,
autograd on its loss, an in-place normalization. The contract every backend keeps (errors, loading,
variants) is tests/test_backend_contract.py."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gptspec.backends import get, load  # noqa: E402
from gptspec.backends.torch import NGPT  # noqa: E402
from gptspec.spec import BackendError, ModelSpec, param_table, reference  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
from gptspec.spec.variants import get_variant  # noqa: E402
from gptspec.weights import save, synthetic_params  # noqa: E402

SPEC = ModelSpec.preset("test-mini")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "mini.safetensors"
    return save(path, SPEC, synthetic_params(SPEC, 0, "conformance"))


def test_load_gives_a_plain_module_with_canonical_names(weights_file):
    model = load("torch", weights_file)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert list(model.state_dict()) == [p.name for p in param_table(SPEC)]
    tokens = torch.randint(0, SPEC.vocab_size, (3, 10))
    logits = model(tokens)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 10, SPEC.vocab_size)
    assert logits.dtype == torch.float32


def test_logits_match_the_reference(weights_file):
    model = load("torch", weights_file)
    tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (2, 30))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).numpy()
    ref = reference.forward(SPEC, synthetic_params(SPEC, 0, "conformance"), tokens)
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < bound("float32", "logits", "rel_l2")


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                             (torch.float16, torch.float16), ("float32", torch.float32)])
def test_dtype(weights_file, dtype, expected):
    model = load("torch", weights_file, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == expected


def test_loss_is_float32_and_trains(weights_file):
    model = load("torch", weights_file, dtype="bfloat16")
    tokens = torch.randint(0, SPEC.vocab_size, (2, 8))
    loss = model.loss(tokens, tokens.roll(-1, 1))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unavailable_device_is_refused(weights_file):
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch.cuda.is_available\\(\\) is False"):
            load("torch", weights_file, device="cuda")
    with pytest.raises(BackendError, match="cpu, cuda or mps"):
        load("torch", weights_file, device="meta")
    assert "cpu" in get("torch").devices()


@pytest.mark.variant("ngpt")
def test_normalize_is_in_place():
    """An optimizer holds the Parameters: the normalization must write into them, not replace them."""
    spec = get_variant("ngpt").apply(SPEC)
    model = NGPT(spec)
    w = model.h[0].attn.c_proj.weight
    before = w.data_ptr()
    with torch.no_grad():
        w.mul_(3.0)
    get("torch").normalize(model)
    assert w.data_ptr() == before and model.h[0].attn.c_proj.weight is w
    assert torch.allclose(w.norm(dim=0), torch.ones(spec.n_embd))


# -- training (backends/torch/train.py); the contract every backend keeps is tests/test_training.py ----
def test_the_first_non_finite_gradient_is_named_before_clipping_spreads_it():
    """One gradient goes NaN (an autograd hook, as an overflow in one layer would): clip_grad_norm_
    would multiply every gradient by the NaN coefficient, so the error must come from the norm, before
    any scaling, and name that tensor rather than the first one in canonical order."""
    from gptspec.spec import TrainingDiverged, TrainSpec

    from helpers import master_weights, train_batches

    spec, train_spec = ModelSpec.preset("test-tiny"), TrainSpec(lr=1e-2, grad_clip=0.7, grad_accum=2)
    batches, _ = train_batches(spec, train_spec, 1, seed=6)
    backend = get("torch")
    model = backend.build(spec, master_weights(spec))
    optimizer = backend.optimizer(model, train_spec)
    model.h[0].attn.c_proj.weight.register_hook(lambda g: g * float("nan"))
    before = backend.optimizer_state(model, optimizer)
    with pytest.raises(TrainingDiverged, match=r"it=0: the gradient of 'h.0.attn.c_proj.weight' is not finite") as e:
        backend.train_step(model, optimizer, train_spec, 0, batches[0])
    assert (e.value.step, e.value.tensor) == (0, "h.0.attn.c_proj.weight")
    after = backend.optimizer_state(model, optimizer)
    assert after.step == before.step == 0
    assert all(np.array_equal(after.params[n], a) for n, a in before.params.items())
    assert all(not a.any() for group in (after.m, after.v) for a in group.values())
