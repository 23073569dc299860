"""The native forward `model(tokens)` of every backend, this tree beside another checkout, one run.

    python -m bench.forward_overhead --against /path/to/other/checkout [--repeat 7] [--rounds 2]

Measures what a user's own loop pays per call (the native model call, the device synchronised
after it), on test-mini (B4 x T64) and the gpt2 shapes (B1 x T64), plus one decoding step (B1 x T1
with a KV cache of 63 positions) where a per-call host sync would weigh most. Each measurement runs
in a fresh process, alternating between the two trees (`--rounds` times each), so that both meet the
same machine load; the table shows the median steady call of each and their ratio. The other tree
is imported as `gptspec` through PYTHONPATH (a folder holding a `gptspec` link to it).
Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = (("test-mini", 4, 64), ("gpt2", 1, 64))


def measure(backend: str, repeat: int) -> dict:
    """In this process: {case: steady seconds} for the native forward of `backend`."""
    import numpy as np

    from bench.common import inputs, time_calls
    from gptspec.backends import get
    from gptspec.spec import ModelSpec
    from gptspec.weights import synthetic_params

    b = get(backend)
    out = {}
    for preset, batch, length in CASES:
        spec = ModelSpec.preset(preset)
        params = {n: a.astype(np.float32) for n, a in synthetic_params(spec, 0, "gpt2").items()}
        model = b.build(spec, params, "float32", "cpu")
        tokens, _ = inputs(spec, batch, length)
        call, decode = _native_calls(backend, model, tokens)
        out[f"{preset} B{batch}xT{length}"] = time_calls("forward", call, warmup=3, repeat=repeat).steady_s
        if preset == "gpt2":
            out["gpt2 decode step"] = time_calls("decode", decode, warmup=3, repeat=repeat).steady_s
    return out


def _native_calls(backend: str, model, tokens):
    """(forward, decode step) closures that call the framework's own model and wait for the result."""
    if backend == "torch":
        import torch

        t = torch.from_numpy(tokens)
        cache = model.make_cache()
        with torch.no_grad():
            model(t[:1, :-1], cache=cache)
        last = t[:1, -1:]

        def forward():
            with torch.no_grad():
                return model(t)

        def decode():  # the same position each time: rewind the cache by one
            for c in cache:
                c.offset -= 1 if c.offset == tokens.shape[1] else 0
            with torch.no_grad():
                return model(last, cache=cache)
        return forward, decode
    if backend == "mlx":
        import mlx.core as mx

        t = mx.array(tokens)
        cache = model.make_cache()
        mx.eval(model(t[:1, :-1], cache=cache))
        last = t[:1, -1:]

        def decode():
            for c in cache:
                c.offset -= 1 if c.offset == tokens.shape[1] else 0
            return mx.eval(model(last, cache=cache))
        return (lambda: mx.eval(model(t))), decode
    from tinygrad import Tensor

    t = Tensor(tokens.astype("int32"))
    last = Tensor(tokens[:1, -1:].astype("int32"))

    def decode():  # an eager one-token call at a fixed position: the native path without the adapter's jit
        return model(last).realize()
    return (lambda: model(t).realize()), decode


def _child(tree: str | None, backend: str, repeat: int) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as link_dir:
        if tree is not None:
            os.symlink(os.path.abspath(tree), Path(link_dir) / "gptspec")
            env["PYTHONPATH"] = link_dir
        code = (f"import json; from bench.forward_overhead import measure; "
                f"print('RESULT', json.dumps(measure({backend!r}, {repeat})))")
        here = Path(__file__).resolve().parent.parent
        proc = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{backend} in {tree or 'this tree'} failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.forward_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the other checkout (e.g. a git worktree of main)")
    ap.add_argument("--backend", action="append", default=None)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per tree, alternating")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from gptspec.backends import available

    rows = {}
    for backend in args.backend or available():
        runs = {"this": [], "other": []}
        for _ in range(args.rounds):
            runs["other"].append(_child(args.against, backend, args.repeat))
            runs["this"].append(_child(None, backend, args.repeat))
        for case in runs["this"][0]:
            this = statistics.median(r[case] for r in runs["this"])
            other = statistics.median(r[case] for r in runs["other"])
            rows[(backend, case)] = (other, this)
        print(f"{backend}: done", file=sys.stderr)
    table = Table(title=f"native model(tokens), float32 CPU, median steady call: {args.against} vs this tree")
    for col in ("backend", "shape", "other (ms)", "this (ms)", "this / other"):
        table.add_column(col)
    for (backend, case), (other, this) in rows.items():
        table.add_row(backend, case, f"{other * 1e3:.2f}", f"{this * 1e3:.2f}", f"{this / other:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
