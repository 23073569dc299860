"""The torch backend as a torch user meets it: load(), an nn.Module, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gptspec.backends import get, load  # noqa: E402
from gptspec.backends.torch import GPT  # noqa: E402
from gptspec.spec import BackendError, InputError, ModelSpec, param_table, reference  # noqa: E402
from gptspec.spec.tolerance import bound  # noqa: E402
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


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_unsupported_dtype_is_refused(weights_file, dtype):
    with pytest.raises(BackendError, match="dtype|cannot run"):
        load("torch", weights_file, dtype=dtype)


def test_unavailable_device_is_refused(weights_file):
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch.cuda.is_available\\(\\) is False"):
            load("torch", weights_file, device="cuda")
    with pytest.raises(BackendError, match="cpu, cuda or mps"):
        load("torch", weights_file, device="meta")


@pytest.mark.parametrize("tokens, message", [
    (torch.tensor([[1, 257]]), "holds id 257, outside the vocabulary \\[0, 257\\)"),
    (torch.tensor([[-1, 2]]), "holds id -1"),
    (torch.zeros(1, 65, dtype=torch.long), "T=65, longer than the context length n_positions=64"),
    (torch.zeros(1, 4), "integer"),
    (torch.zeros(4, dtype=torch.long), "shape \\(B, T\\)"),
])
def test_bad_tokens_are_named(weights_file, tokens, message):
    model = load("torch", weights_file)
    with pytest.raises(InputError, match=message):
        model(tokens)


def test_bad_targets_are_named(weights_file):
    model = load("torch", weights_file)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match="targets must have the shape of tokens"):
        model.loss(tokens, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match="targets hold id 300"):
        model.loss(tokens, torch.full((2, 4), 300))
    with pytest.raises(InputError, match="every target equals the ignore index"):
        model.loss(tokens, torch.full((2, 4), -100))


def test_own_init_follows_the_spec():
    torch.manual_seed(0)
    spec = ModelSpec(vocab_size=1000, n_positions=64, n_embd=256, n_layer=8, n_head=4)
    sd = GPT(spec).state_dict()
    assert abs(sd["wte.weight"].std().item() - 0.02) < 5e-4
    assert abs(sd["h.1.attn.c_proj.weight"].std().item() - 0.005) < 2e-4  # 0.02 / sqrt(16)
    assert not sd["h.1.attn.c_attn.bias"].any() and bool((sd["ln_f.weight"] == 1).all())


def test_synthetic_name_and_backend_listing():
    model = load("torch", "synthetic:test-tiny:3")
    assert model.spec == ModelSpec.preset("test-tiny")
    assert "cpu" in get("torch").devices()


def test_transformers_checkpoint_gives_transformers_logits(tmp_path):
    """External oracle: a checkpoint written by GPT2LMHeadModel.save_pretrained, with transformers'
    own random init, loaded through load("torch", path), gives transformers' own logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=3, n_head=6)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that dropping one would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path)
    ours = load("torch", tmp_path)
    tokens = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        theirs, mine = hf(tokens).logits, ours(tokens)
    rel = (torch.linalg.norm(mine - theirs) / torch.linalg.norm(theirs)).item()
    assert rel < bound("float32", "logits", "rel_l2", pairwise=True), rel


def test_early_exit_loss_trains_through_model_loss_and_names_bad_draws():
    spec = SPEC.replace(loss="early_exit", n_layer=2)
    params = synthetic_params(spec, 0, "conformance")
    model = get("torch").build(spec, params)
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, spec.vocab_size, (2, 9)), rng.integers(0, spec.vocab_size, (2, 9))
    from gptspec.conformance.cases import exit_draws

    draws = exit_draws(spec, params, tokens, 0)
    loss = model.loss(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(draws).float())
    loss.backward()  # a plain autograd graph: the user's training loop
    want = reference.loss(spec, params, tokens, targets, draws)
    assert abs(loss.item() - want) <= bound("float32", "loss", "rel_l2") * abs(want)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(InputError, match="needs its draws"):
        model.loss(torch.from_numpy(tokens), torch.from_numpy(targets))
    with pytest.raises(InputError, match=r"draws must have shape \(n_layer, B, T\) = \(2, 2, 9\)"):
        model.loss(torch.from_numpy(tokens), torch.from_numpy(targets), torch.zeros(1, 2, 9))


def test_residual_stats_are_the_references(weights_file):
    model = load("torch", weights_file)
    tokens = np.random.default_rng(2).integers(0, SPEC.vocab_size, (2, 11))
    got = model.residual_stats(torch.from_numpy(tokens))
    want = reference.residual_stats(SPEC, synthetic_params(SPEC, 0, "conformance"), tokens)
    assert set(got) == set(want) == {"input", "mid", "output", "normed"}
    for key in want:
        assert got[key].shape == (SPEC.n_layer,)
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-5)
