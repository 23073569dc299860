"""tinygrad's BEAM search through the backend (GPTSPEC_TINYGRAD_BEAM): its one-time cost and its gain.

    python -m bench.tinygrad_beam [--preset gpt2] [--batch 1] [--length 64] [--beam 0 --beam 2] [--repeat 3] [--grads]

For each BEAM width, two fresh processes on one empty tinygrad cache (CACHEDB in a temporary
folder, so nothing searched or compiled earlier counts): the first pays the search (and every
compile), the second finds the search's choices in the disk cache, as every later run on the
machine does. Each times the backend's forward (`backend.forward`, a TinyJit per model and shape,
synthetic float32 weights): the first call (schedule, search, compile), and the median of the
replays after TinyJit's capture. --grads times loss_and_grads instead. Benchmarks measure; they
never assert.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(preset: str, batch: int, length: int, repeat: int, grads: bool) -> dict:
    """In this process: {first_s, steady_s} of the backend's forward (or loss_and_grads)."""
    import numpy as np

    from bench.common import inputs, time_calls
    from gptspec.backends import get
    from gptspec.spec import ModelSpec
    from gptspec.weights import synthetic_params

    b = get("tinygrad")
    spec = ModelSpec.preset(preset)
    params = {n: a.astype(np.float32) for n, a in synthetic_params(spec, 0, "gpt2").items()}
    model = b.build(spec, params, "float32")
    tokens, targets = inputs(spec, batch, length)
    call = (lambda: b.loss_and_grads(model, tokens, targets)) if grads else (lambda: b.forward(model, tokens))
    t = time_calls("grads" if grads else "forward", call, warmup=2, repeat=repeat)  # call 2 captures
    return {"first_s": t.first_s, "steady_s": t.steady_s}


def _child(beam: int, cache: Path, args) -> dict:
    env = dict(os.environ, CACHEDB=str(cache), GPTSPEC_TINYGRAD_BEAM=str(beam))
    env.pop("BEAM", None)  # tinygrad's own variable would apply to every call, searched or not
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as link_dir:
        os.symlink(here, Path(link_dir) / "gptspec")
        env["PYTHONPATH"] = link_dir + os.pathsep + str(here)
        code = (f"import json, sys; from bench.tinygrad_beam import measure; r = measure({args.preset!r}, "
                f"{args.batch}, {args.length}, {args.repeat}, {args.grads}); print('RESULT', json.dumps(r))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=link_dir, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"BEAM={beam} failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tinygrad_beam", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--beam", type=int, action="append", default=None, help="widths to measure (default: 0 and 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--grads", action="store_true", help="time loss_and_grads rather than forward")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    rows = []
    for beam in args.beam or [0, 2]:
        with tempfile.TemporaryDirectory() as folder:
            cache = Path(folder) / "cache.db"
            cold, warm = _child(beam, cache, args), _child(beam, cache, args)
        rows.append((beam, cold, warm))
        print(f"BEAM={beam}: done", file=sys.stderr)
    what = "loss_and_grads" if args.grads else "forward"
    table = Table(title=f"tinygrad {what}, {args.preset} B{args.batch}xT{args.length}, float32, by BEAM width")
    for col in ("BEAM", "first call, empty cache (s)", "first call, cache kept (s)", "steady call (s)", "steady vs BEAM=0"):
        table.add_column(col)
    base = rows[0][2]["steady_s"] if rows[0][0] == 0 else None
    for beam, cold, warm in rows:
        table.add_row(str(beam), f"{cold['first_s']:.1f}", f"{warm['first_s']:.1f}", f"{warm['steady_s']:.3f}",
                      f"{base / warm['steady_s']:.2f}x" if base else "-")
    Console(width=140).print(table)
    print(json.dumps([{"beam": b, "cold": c, "warm": w} for b, c, w in rows]))


if __name__ == "__main__":
    main()
