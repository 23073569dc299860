"""GPT-2 124M in tinygrad (TinyJit) beside gptspec-torch: first call and steady state, one run.

    python -m bench.tinygrad_bench [--batch 1] [--length 64] [--repeat 3] [--warm-cache]

float32, synthetic GPT-2-initialised weights, fixed (B, T) (default 1 x 64: the conformance suite's
full-size case). tinygrad's "first call" is the eager call that schedules, generates and compiles
every kernel; by default tinygrad's on-disk kernel cache is off for the run (CACHELEVEL=0), so the
figure is what a fresh machine pays and does not depend on earlier runs (--warm-cache: use it).
Call 2 is TinyJit's capture; "steady" is the median of the replays after it. torch runs eagerly
(first call: allocation and warm-up). Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import os
import platform

from bench.common import gpt2_weights, inputs, print_table, time_calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tinygrad_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed steady-state calls per measurement")
    ap.add_argument("--warm-cache", action="store_true", help="let tinygrad's first calls use its on-disk kernel cache")
    args = ap.parse_args(argv)

    if not args.warm_cache:  # before tinygrad is imported: its compile workers read the environment
        os.environ["CACHELEVEL"] = "0"
    import torch
    from tinygrad import Device, Tensor

    from gptspec.backends import get
    from gptspec.backends.tinygrad.backend import _logits, _loss_and_grads, jit

    spec, params = gpt2_weights("gpt2")
    tokens, targets = inputs(spec, args.batch, args.length)
    timings = []

    tb = get("torch")
    tm = tb.build(spec, params, "float32", "cpu")
    t_tok, t_tgt = torch.from_numpy(tokens), torch.from_numpy(targets)

    def torch_forward():
        with torch.no_grad():
            tm(t_tok)

    def torch_step():
        tm.zero_grad(set_to_none=True)
        tm.loss(t_tok, t_tgt).backward()

    timings.append(time_calls("torch forward", torch_forward, repeat=args.repeat))
    timings.append(time_calls("torch forward+backward", torch_step, repeat=args.repeat))
    del tm

    gb = get("tinygrad")
    gm = gb.build(spec, params, "float32", None)
    dev = gm.wte.weight.device
    g_tok = Tensor(tokens.astype("int32"), device=dev).realize()
    g_tgt = Tensor(targets.astype("int32"), device=dev).realize()
    forward, step = jit(gm, _logits, tokens.shape), jit(gm, _loss_and_grads, tokens.shape)

    def synced(fn, *fn_args):
        return lambda: (fn(*fn_args), Device[dev].synchronize())

    timings.append(time_calls("tinygrad forward (TinyJit)", synced(forward, g_tok), repeat=args.repeat))
    timings.append(time_calls("tinygrad forward+backward (TinyJit)", synced(step, g_tok, g_tgt), repeat=args.repeat))

    cache = "kernels from the disk cache where it has them" if args.warm_cache else "every kernel compiled (CACHELEVEL=0)"
    print(f"GPT-2 124M, float32, B={args.batch} T={args.length}, {platform.machine()} {platform.processor() or ''}".strip())
    print(f"{gb.version()} on {dev} ({type(Device[dev].renderer).__name__}), {tb.version()} on cpu; "
          f"tinygrad first call: {cache}; steady: median of {args.repeat} calls after 2")
    base = {"forward": timings[0], "forward+backward": timings[1]}
    print_table("forward", [timings[0], timings[2]], baseline="torch forward")
    print_table("forward+backward", [timings[1], timings[3]], baseline="torch forward+backward")
    for t, kind in ((timings[2], "forward"), (timings[3], "forward+backward")):
        b = base[kind]
        print(f"tinygrad / torch, {kind}: first call {t.first_s / b.first_s:.1f}x, steady {t.steady_s / b.steady_s:.1f}x")


if __name__ == "__main__":
    main()
