"""What several test modules share: the variants' specs and weights, the error checks against the
float64 reference, and the few framework-specific steps a backend-generic test needs (a native
tensor from numpy, a seed, the native model classes)."""
from __future__ import annotations

import importlib

import numpy as np

from gptspec.conformance.metrics import errors
from gptspec.spec import ModelSpec
from gptspec.spec.tolerance import bound
from gptspec.spec.variants import VARIANTS, get_variant
from gptspec.weights import synthetic_params

#: every named variant, from spec/variants.py, so that no test keeps a list of its own that could drift
VARIANT_NAMES = list(VARIANTS)
#: the variants whose forward differs from GPT-2's (a variant that changes only the loss has GPT-2's)
FORWARD_VARIANTS = [name for name, v in VARIANTS.items() if set(v.changes) != {"loss"}]
NGPT_VARIANTS = [name for name, v in VARIANTS.items() if v.changes.get("architecture") == "ngpt"]


def variant_spec(name: str, base: ModelSpec) -> ModelSpec:
    return get_variant(name).apply(base)


def params64(spec: ModelSpec, seed: int = 0, init: str = "conformance") -> dict[str, np.ndarray]:
    """The synthetic weights of `spec` in float64, as the reference computes with them."""
    return {k: v.astype(np.float64) for k, v in synthetic_params(spec, seed, init).items()}


def master_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The float32 weights a training test starts every backend and the float64 reference from."""
    return {n: np.asarray(a, np.float32) for n, a in synthetic_params(spec, seed, "conformance").items()}


def train_batches(spec: ModelSpec, train_spec, n_steps: int, seed: int, B: int = 2, T: int = 8):
    """(batches[i][k] = (tokens, targets), draws[i][k] or None) for n_steps steps of train_spec.grad_accum
    micro-batches: draws only for loss="early_exit" (SPEC.md 18.3)."""
    rng = np.random.default_rng(1000 + seed)
    V, n = spec.vocab_size, train_spec.grad_accum
    batches = [[(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)] for _ in range(n_steps)]
    if spec.loss != "early_exit":
        return batches, None
    return batches, [[rng.random((spec.n_layer, B, T)) for _ in range(n)] for _ in range(n_steps)]


def ids(spec: ModelSpec, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab_size, shape)


def rel_l2(x, ref) -> float:
    return errors(np.asarray(x, np.float64), np.asarray(ref, np.float64))[0]


def assert_close(x, ref, quantity: str, what: str, dtype: str = "float32") -> None:
    """`x` within SPEC.md 9's bounds (rel_l2 and rel_max) of the reference value `ref`."""
    rel_l2_, rel_max, _ = errors(np.asarray(x, np.float64), np.asarray(ref, np.float64))
    limit_l2, limit_max = bound(dtype, quantity, "rel_l2"), bound(dtype, quantity, "rel_max")
    assert rel_l2_ < limit_l2 and rel_max < limit_max, \
        f"{what}: {quantity} rel_l2 {rel_l2_:.3g} (bound {limit_l2:.3g}), rel_max {rel_max:.3g} (bound {limit_max:.3g})"


def selected_backends(config) -> list[str]:
    """The backends under test: --backend's choice (default: every installed one), each usable here."""
    from gptspec import backends

    installed = backends.available()
    return [n for n in (config.getoption("--backend") or installed) if n in installed]


# -- the framework-specific steps of a backend-generic test --------------------------------------------
def native(backend_name: str, array: np.ndarray):
    """`array` as the framework's own tensor, as its user would hand it to the model."""
    array = np.ascontiguousarray(array)
    if backend_name == "torch":
        import torch

        return torch.from_numpy(array)
    if backend_name == "mlx":
        import mlx.core as mx

        return mx.array(array)
    if backend_name == "tinygrad":
        from tinygrad import Tensor

        return Tensor(array)
    raise NotImplementedError(f"tests/helpers.py has no native tensor for backend {backend_name!r}: add it here")


def from_native(backend_name: str, x) -> np.ndarray:
    """A framework's tensor as float32 numpy (what a user would do to look at it)."""
    if backend_name == "torch":
        return x.detach().float().cpu().numpy()
    if backend_name == "mlx":
        import mlx.core as mx

        return np.asarray(x.astype(mx.float32))
    if backend_name == "tinygrad":
        return x.float().numpy()
    raise NotImplementedError(f"tests/helpers.py cannot read a tensor of backend {backend_name!r}: add it here")


def seed_framework(backend_name: str, seed: int) -> None:
    """Seed the framework's own random initialization."""
    if backend_name == "torch":
        import torch

        torch.manual_seed(seed)
    elif backend_name == "mlx":
        import mlx.core as mx

        mx.random.seed(seed)
    elif backend_name == "tinygrad":
        from tinygrad import Tensor

        Tensor.manual_seed(seed)
    else:
        raise NotImplementedError(f"tests/helpers.py cannot seed backend {backend_name!r}: add it here")


def native_class(backend_name: str, spec: ModelSpec) -> type:
    """The framework's own model class for `spec` (GPT or NGPT, exported by backends/<name>/__init__.py)."""
    package = importlib.import_module(f"gptspec.backends.{backend_name}")
    return package.NGPT if spec.architecture == "ngpt" else package.GPT
