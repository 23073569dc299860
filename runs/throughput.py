"""Tokens per second and the model flops utilization (MFU) of a training step.

Flops per token (PaLM, appendix B; nanoGPT's estimate_mfu): 6 N + 12 L H Q T, with N the parameters
less the position embedding (nanoGPT's non-embedding count: the tied token embedding is the LM head's
matmul, so it stays), L layers, H heads, Q the head size and T the block size: the forward and
backward matmuls (6 N) plus attention's QK^T and AV (12 L H Q T). MFU is the achieved flops per second
over a stated peak: a table of dense peaks for common GPUs, or on a CPU a peak measured once per
process by a timed float32 matmul (numpy, 1024^3, the best of 5), which is what a CPU's BLAS reaches
on this machine, not a datasheet number.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..spec import ModelSpec, param_table

# Dense (no sparsity) peaks in flop/s: bfloat16 tensor cores, and plain float32 (no TF32), from the
# vendors' datasheets. A name matches when it occurs in the device's name.
GPU_PEAKS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12), "A10G": (70e12, 31.2e12), "A10": (125e12, 31.2e12), "V100": (125e12, 15.7e12),
    "RTX 4090": (165e12, 82.6e12), "RTX 3090": (71e12, 35.6e12), "T4": (65e12, 8.1e12),
}


@dataclass(frozen=True)
class Peak:
    flops: float | None   # flop/s, None when unknown
    source: str           # what the number is, for the display and the docs


def flops_per_token(spec: ModelSpec, block_size: int) -> float:
    n = sum(int(np.prod(p.shape)) for p in param_table(spec) if p.role != "position_embedding")
    return 6.0 * n + 12.0 * spec.n_layer * spec.n_head * spec.head_dim * block_size


@lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # the first call may load the BLAS
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak(device_name: str, accelerator: bool, precision: str) -> Peak:
    """The peak the MFU is stated against, for a device named `device_name`."""
    if not accelerator:
        f = measured_cpu_peak()
        return Peak(f, f"CPU: numpy float32 1024^3 matmul measured here, {f / 1e9:.1f} GFLOP/s")
    for key, (bf16, fp32) in GPU_PEAKS.items():
        if key.lower() in device_name.lower():
            f = bf16 if precision == "mixed_bfloat16" else fp32
            kind = "bfloat16 dense" if precision == "mixed_bfloat16" else "float32 (no TF32)"
            return Peak(f, f"{key} {kind} datasheet peak, {f / 1e12:g} TFLOP/s")
    return Peak(None, f"no known peak for {device_name!r}: MFU not estimated")


def device_description(backend: str, device: str | None) -> tuple[str, bool]:
    """(a name for the device a backend runs on, whether it is an accelerator)."""
    if backend == "torch":
        import torch

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev), True
        return dev.type, dev.type != "cpu"
    name = (device or "cpu").lower()
    return name, not name.startswith(("cpu", "clang", "llvm"))


def mfu(tokens_per_s: float, flops_token: float, pk: Peak) -> float | None:
    return None if pk.flops is None else tokens_per_s * flops_token / pk.flops
