"""Shared helpers for the benchmarks: synthetic GPT-2 weights, inputs and a side-by-side timer.

Benchmarks measure; they never assert. Ratios are only quoted between numbers taken in the
same run on the same machine (see README, "Benchmarks").
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gptspec.spec import ModelSpec
from gptspec.weights import synthetic_params


def gpt2_weights(preset: str = "gpt2", seed: int = 0):
    spec = ModelSpec.preset(preset)
    return spec, synthetic_params(spec, seed, "gpt2")


def inputs(spec: ModelSpec, batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, spec.vocab_size, (batch, length), dtype=np.int64)
    targets = rng.integers(0, spec.vocab_size, (batch, length), dtype=np.int64)
    return tokens, targets


@dataclass
class Timing:
    name: str
    first_s: float      # the first call: compilation, allocation, warm-up
    steady_s: float     # median of the calls after warm-up
    runs: int


def time_calls(name: str, fn: Callable[[], object], warmup: int = 2, repeat: int = 5) -> Timing:
    """fn must block until its result is computed (synchronise the device inside it)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(name, first, statistics.median(times), repeat)


def print_table(title: str, timings: list[Timing], baseline: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    base = next((t for t in timings if t.name == baseline), None)
    table = Table(title=title)
    for col in ("what", "first call (s)", "steady (s)", f"x {baseline}" if baseline else "ratio"):
        table.add_column(col)
    for t in timings:
        ratio = f"{t.steady_s / base.steady_s:.2f}" if base else ""
        table.add_row(t.name, f"{t.first_s:.3f}", f"{t.steady_s:.3f}", ratio)
    Console(width=140).print(table)
