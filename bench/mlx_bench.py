"""GPT-2 124M in MLX, side by side in one run: gptspec-MLX vs mlx-lm's GPT-2 vs gptspec-torch.

    python -m bench.mlx_bench [--batch 4] [--length 128] [--repeat 3] [--no-bundled]

Float32, synthetic GPT-2-initialised weights loaded into all three, fixed (batch, length):
forward, then forward+backward (mean cross-entropy; mlx-lm's model with the loss an mlx-lm user
writes, nn.losses.cross_entropy). Also: float32 GEMM GFLOP/s, and MLX with its bundled reference
BLAS (a subprocess with GPTSPEC_MLX_BLAS=off, forward only unless --bundled-backward: it is slow).
Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

from bench.common import Timing, gpt2_weights, inputs, print_table, time_calls

GEMM_N = 1024


def time_interleaved(contenders: dict[str, Callable[[], object]], warmup: int, repeat: int) -> list[Timing]:
    """Like common.time_calls, but one call of each contender per round, in an order that rotates
    from round to round: a change of the machine's load, or a cost of coming after another framework
    (caches, freed memory), then falls on every contender alike."""
    first, times = {}, {name: [] for name in contenders}
    for name, fn in contenders.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
    names = list(contenders)
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return [Timing(name, first[name], statistics.median(times[name]), repeat) for name in contenders]


def _mlx():
    from gptspec.backends import get

    backend = get("mlx")  # first: loads the optimised BLAS before anything imports mlx.core
    import mlx.core as mx
    import mlx.nn as nn

    return backend, mx, nn


def gemm_gflops_mlx() -> float:
    _, mx, _ = _mlx()
    a, b = mx.random.normal((GEMM_N, GEMM_N)), mx.random.normal((GEMM_N, GEMM_N))
    t = time_calls("gemm", lambda: mx.eval(a @ b), warmup=1, repeat=3)
    return 2 * GEMM_N**3 / t.steady_s / 1e9


def gemm_gflops_torch() -> float:
    import torch

    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    t = time_calls("gemm", lambda: a @ b, warmup=1, repeat=5)
    return 2 * GEMM_N**3 / t.steady_s / 1e9


def mlx_contenders(batch: int, length: int, with_compiled: bool = True, with_mlx_lm: bool = True):
    """name -> a call that blocks until done, for forward and for forward+backward; and notes."""
    backend, mx, nn = _mlx()
    from gptspec.backends.mlx import cross_entropy

    spec, params = gpt2_weights()
    tokens_np, targets_np = inputs(spec, batch, length)
    tokens, targets = mx.array(tokens_np), mx.array(targets_np)
    ours = backend.build(spec, params, "float32")
    forward, train, notes = {}, {}, {}

    def train_step(model, loss):
        value_and_grad = nn.value_and_grad(model, loss)
        return lambda: mx.eval(value_and_grad(tokens, targets))

    forward["gptspec-mlx"] = lambda: mx.eval(ours(tokens))
    train["gptspec-mlx"] = train_step(ours, ours.loss)
    if with_compiled:
        compiled = mx.compile(lambda t: ours(t))
        forward["gptspec-mlx mx.compile"] = lambda: mx.eval(compiled(tokens))
        # value_and_grad swaps the model's arrays while tracing: its state is an output too
        compiled_step = mx.compile(nn.value_and_grad(ours, lambda t, y: cross_entropy(ours(t), y)),
                                   inputs=ours.state, outputs=ours.state)
        train["gptspec-mlx mx.compile"] = lambda: mx.eval(compiled_step(tokens, targets))
    if with_mlx_lm:
        theirs = mlx_lm_gpt2(spec, params)
        same = mx.abs(theirs(tokens) - ours(tokens)).max().item() / mx.abs(ours(tokens)).max().item()
        notes["mlx-lm vs gptspec-mlx logits (relative max difference)"] = f"{same:.1e}"
        forward["mlx-lm gpt2"] = lambda: mx.eval(theirs(tokens))
        train["mlx-lm gpt2"] = train_step(
            theirs, lambda t, y: nn.losses.cross_entropy(theirs(t), y, reduction="mean"))
    return forward, train, notes


def mlx_lm_gpt2(spec, params):
    """mlx-lm's GPT-2 holding the same weights: its names are ours under `model.`, layouts equal."""
    import mlx.core as mx
    from mlx_lm.models.gpt2 import Model, ModelArgs

    args = ModelArgs(model_type="gpt2", n_ctx=spec.n_positions, n_embd=spec.n_embd, n_head=spec.n_head,
                     n_layer=spec.n_layer, n_positions=spec.n_positions, layer_norm_epsilon=spec.norm_eps,
                     vocab_size=spec.vocab_size)
    model = Model(args)
    model.load_weights([("model." + n, mx.array(a)) for n, a in params.items()])
    mx.eval(model.parameters())
    return model.eval()


def torch_contenders(batch: int, length: int):
    import torch

    from gptspec.backends import get

    spec, params = gpt2_weights()
    tokens_np, targets_np = inputs(spec, batch, length)
    tokens, targets = torch.from_numpy(tokens_np), torch.from_numpy(targets_np)
    model = get("torch").build(spec, params, "float32")

    def forward():
        with torch.no_grad():
            model(tokens)

    def train_step():
        model.zero_grad(set_to_none=True)
        model.loss(tokens, targets).backward()

    return forward, train_step


def bundled_blas(args) -> dict:
    """The same MLX measurements in a fresh process whose MLX keeps its bundled reference BLAS."""
    cmd = [sys.executable, "-m", "bench.mlx_bench", "--worker", "--batch", str(args.batch),
           "--length", str(args.length), "--repeat", "1"] + (["--bundled-backward"] if args.bundled_backward else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GPTSPEC_MLX_BLAS": "off"})
    if out.returncode:
        raise RuntimeError(f"bundled-BLAS worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(args) -> None:
    forward, train, _ = mlx_contenders(args.batch, args.length, with_compiled=False, with_mlx_lm=False)
    fwd = time_calls("gptspec-mlx", forward["gptspec-mlx"], warmup=1, repeat=args.repeat)
    bwd = time_calls("gptspec-mlx", train["gptspec-mlx"], warmup=1, repeat=args.repeat) if args.bundled_backward else None
    print(json.dumps({"gemm": gemm_gflops_mlx(), "forward": fwd.__dict__, "forward+backward": bwd and bwd.__dict__}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.mlx_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-bundled", action="store_true", help="skip the bundled-BLAS subprocess")
    ap.add_argument("--bundled-backward", action="store_true", help="also time forward+backward there")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    backend, mx, _ = _mlx()
    import torch

    print(f"{backend.version()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{os.cpu_count()} CPUs; device {mx.default_device()}")
    print(f"GPT-2 124M, float32, batch {args.batch} x length {args.length}; median of {args.repeat} rounds "
          "after warm-up, one call of each contender per round\n")
    forward, train, notes = mlx_contenders(args.batch, args.length)
    forward["gptspec-torch"], train["gptspec-torch"] = torch_contenders(args.batch, args.length)
    fwd = time_interleaved(forward, warmup=1, repeat=args.repeat)
    fwdbwd = time_interleaved(train, warmup=1, repeat=args.repeat)
    gemm = {"mlx (optimised BLAS)": gemm_gflops_mlx(), "torch": gemm_gflops_torch()}
    if not args.no_bundled:
        bundled = bundled_blas(args)
        gemm["mlx (bundled BLAS)"] = bundled["gemm"]
        fwd.append(Timing(**{**bundled["forward"], "name": "gptspec-mlx, bundled BLAS"}))
        if bundled["forward+backward"]:
            fwdbwd.append(Timing(**{**bundled["forward+backward"], "name": "gptspec-mlx, bundled BLAS"}))

    print_table("forward", fwd, baseline="gptspec-mlx")
    print_table("forward + backward", fwdbwd, baseline="gptspec-mlx")
    tokens = args.batch * args.length
    for kind, timings in (("forward", fwd), ("fwd+bwd", fwdbwd)):
        for t in timings:
            print(f"  {kind:8s} {t.name:28s} {tokens / t.steady_s:8.0f} tokens/s")
    print(f"\nfloat32 GEMM {GEMM_N}^3: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm.items()))
    for k, v in notes.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
