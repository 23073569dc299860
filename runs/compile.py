"""Compiling the training step where it helps (docs/training.md has the measurements).

torch: torch.compile of the model's loss (the forward that the step differentiates), so the step's
forward and backward are Inductor's kernels; the optimizer and the norm stay eager. The module's
parameters are untouched (the checkpoint and optimizer_state read them as before).
MLX: mx.compile of each micro-batch's value_and_grad (backends/mlx/train.py, enable_compile).
tinygrad: none (REASONS): it compiles every kernel already, and a TinyJit of the step would apply the
update before the finiteness check can read the loss (backends/tinygrad/train.py).

A compiled step may round differently from the eager one (fused elementwise chains): a compiled run is
equal to an eager one within the trajectory bounds of SPEC.md 20.11, not bit for bit; resuming a
compiled run compiled is bitwise (the same kernels replay).
"""
from __future__ import annotations

from ..spec import BackendError

#: the default of --compile per backend: what measured faster on the char recipe on this project's CPU
#: (4 layers, 128 wide, block 64, batch 16; docs/training.md, "Compiling")
DEFAULTS = {"torch": False, "mlx": False, "tinygrad": False}
REASONS = {
    "tinygrad": "tinygrad compiles every kernel already; a TinyJit of the step would apply the update before the "
                "finiteness check can read the loss (backends/tinygrad/train.py), so gptspec offers no --compile "
                "for it",
}


def check_compile(backend_name: str, wanted: bool | None) -> None:
    """Refuse --compile for a backend without a compile path, before anything is built."""
    if wanted and backend_name not in ("torch", "mlx"):
        raise BackendError(f"--compile: {REASONS.get(backend_name, f'{backend_name} has no compile path in gptspec')}")


def apply_compile(backend, model, wanted: bool | None) -> str:
    """Compile `model`'s step for `backend` if `wanted` (None: the backend's measured default).
    Returns what was done, for the run's header."""
    name = backend.name
    on = DEFAULTS.get(name, False) if wanted is None else wanted
    if not on:
        return "off" + (" (default, measured)" if wanted is None else "")
    if name == "torch":
        import torch

        # the instance attribute shadows the method for this model only; train_step calls model.loss
        model.loss = torch.compile(model.loss)
        return "torch.compile(model.loss)"
    if name == "mlx":
        from ..backends.mlx.train import enable_compile

        enable_compile(model)
        return "mx.compile(value_and_grad(loss))"
    check_compile(name, True)
    raise AssertionError(f"no compile path for {name}")  # check_compile refused it
