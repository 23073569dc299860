"""Half-precision matrix products on the CPU: the backends' `linear` (a float32 GEMM, rounded once to the dtype)
beside the framework's own half-precision product, in one process.

    python -m bench.half_products [--repeat 3] [--backend torch --backend mlx]

Times the loss and every gradient of GPT-2 124M (B1 x T64, synthetic weights) through the backend, each half
dtype twice: as the backend computes it (backends/<name>/model.py `linear`), and with `linear` replaced by the
framework's own product of the dtype (what a plain nn.Linear does), the two alternating call by call so that
both meet the same machine load. torch keeps its own bfloat16 product (oneDNN's, the faster there), so only
its float16 is timed. Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time
from contextlib import contextmanager

import numpy as np

HALF = {"torch": ("float16",), "mlx": ("bfloat16", "float16")}


def framework_product(backend: str):
    """The framework's own x @ weight.T (+ bias) in the inputs' dtype, as its nn.Linear computes it."""
    if backend == "torch":
        import torch.nn.functional as F

        return F.linear
    import mlx.core as mx

    return lambda x, weight, bias=None: x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


@contextmanager
def product(backend: str, own: bool):
    model = importlib.import_module(f"gptspec.backends.{backend}.model")
    kept = model.linear
    if own:
        model.linear = framework_product(backend)
    try:
        yield
    finally:
        model.linear = kept


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from bench.common import gpt2_weights, inputs
    from gptspec.backends import available, get

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", choices=sorted(HALF))
    p.add_argument("--repeat", type=int, default=3, help="timed calls of each product (>= 1), after a warm-up")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    missing = [n for n in args.backend or () if n not in available()]
    if missing:
        p.error(f"not installed or not usable here: {', '.join(missing)}")
    spec, params = gpt2_weights()
    params = {n: a.astype(np.float32) for n, a in params.items()}
    tokens, targets = inputs(spec, 1, 64)
    table = Table(title="GPT-2 124M loss and gradients, B1 x T64, CPU: seconds per call (median)")
    for col in ("backend", "dtype", "gptspec (float32 GEMM)", "framework's own product", "ratio"):
        table.add_column(col)
    console = Console(width=140)
    with console.status("") as status:  # a live line: a framework's own half product takes ~10 s a call
        for name in args.backend or [n for n in HALF if n in available()]:
            b = get(name)
            for dtype in HALF[name]:
                model = b.build(spec, params, dtype, "cpu")
                times = {True: [], False: []}
                for r in range(args.repeat + 1):  # the first round warms both up and is not counted
                    for own in (False, True):
                        status.update(f"{name} {dtype}, round {r + 1} of {args.repeat + 1}: "
                                      f"{'the framework' if own else 'gptspec'}'s product")
                        with product(name, own):
                            start = time.perf_counter()
                            b.loss_and_grads(model, tokens, targets)
                            times[own].append(time.perf_counter() - start)
                ours, theirs = (statistics.median(times[own][1:]) for own in (False, True))
                table.add_row(name, dtype, f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.1f}x")
                del model
    console.print(table)


if __name__ == "__main__":
    main()
