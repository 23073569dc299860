"""Generation speed (SPEC.md 12), side by side in one run: gptspec's KV-cache generation in each
backend beside the same framework's own GPT-2 generation, holding the same weights.

    python -m bench.generation_bench [--backend torch --backend mlx] [--batch 1 --batch 8]
                                     [--prompt 128] [--new 64] [--repeat 2] [--torch-threads 1]

GPT-2 124M shapes, synthetic GPT-2-initialised weights, float32, greedy, `--new` tokens after a
`--prompt`-token prompt (random ids; every row of a batch its own prompt, all the same length).
Prompt processing (the prefill: until the first new token is known) and decoding (every later
token) are timed separately and given as tokens/s over the batch:

- gptspec-torch: backends/generation.py over TorchBackend.extend; its peer, Hugging Face
  transformers' GPT2LMHeadModel.generate(do_sample=False, use_cache=True), from the same weights
  written in Hugging Face layout (weights.write_hf), timed with a streamer that notes when each
  token arrives.
- gptspec-mlx: the same loop over MLXBackend.extend; its peer, mlx-lm's own GPT-2
  (mlx_lm.models.gpt2.Model with the same weights, bench/mlx_bench.py) through mlx-lm's
  generate_step (what stream_generate runs, without a tokenizer) at batch 1 and its
  BatchGenerator at larger batches.

Each contender first runs a short warm-up; then one call of each per round, `--repeat` rounds,
and the best round is reported (the machine is shared: the best is the least disturbed).
Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bench.common import gpt2_weights, inputs

Run = Callable[[list[list[int]], int], tuple[float, float, np.ndarray]]  # -> (prefill s, decode s, new ids)


@dataclass
class Result:
    name: str
    batch: int
    prefill_s: float
    decode_s: float
    tokens: np.ndarray  # (B, new)


def gptspec_run(name: str, spec, params) -> Run:
    from gptspec.backends import get
    from gptspec.backends.generation import steps
    from gptspec.spec.sampling import Sampling

    backend = get(name)
    model = backend.build(spec, params, "float32")

    def run(prompts, new):
        out, t0, first = [], time.perf_counter(), None
        for step in steps(backend, model, spec, prompts, new, Sampling(temperature=0), stop=None):
            first = first or time.perf_counter()
            out.append(step.tokens)
        end = time.perf_counter()
        return first - t0, end - first, np.stack(out, axis=1)

    return run


def hf_run(spec, params, directory: str) -> Run:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.generation.streamers import BaseStreamer

    from gptspec.weights import write_hf

    write_hf(directory, spec, params, "float32", synthetic=True)
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first the prompt (before any compute), then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(prompts, new):
        ids = torch.tensor(prompts)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, use_cache=True, streamer=clock, pad_token_id=spec.vocab_size - 1)
        end = time.perf_counter()
        return clock.times[1] - t0, end - clock.times[1], out[:, ids.shape[1]:].numpy()

    return run


def mlx_lm_run(spec, params) -> Run:
    from bench.mlx_bench import _mlx, mlx_lm_gpt2

    _, mx, _ = _mlx()  # the optimised BLAS before mlx.core
    from mlx_lm.generate import BatchGenerator, generate_step

    model = mlx_lm_gpt2(spec, params)

    def run(prompts, new):
        t0, first = time.perf_counter(), None
        if len(prompts) == 1:
            out = []
            for token, _ in generate_step(mx.array(prompts[0]), model, max_tokens=new):
                first = first or time.perf_counter()
                out.append(token)
            tokens = np.array([out])
        else:
            gen = BatchGenerator(model, max_tokens=new, prefill_batch_size=len(prompts),
                                 completion_batch_size=len(prompts))
            uids = gen.insert(prompts)
            out = {u: [] for u in uids}
            while any(len(v) < new for v in out.values()):
                responses = gen.next_generated()
                if not responses:
                    break
                first = first or time.perf_counter()
                for r in responses:
                    out[r.uid].append(r.token)
            gen.close()
            tokens = np.array([out[u] for u in uids])
        end = time.perf_counter()
        return first - t0, end - first, tokens

    return run


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """Where two greedy continuations first differ (synthetic weights: near-ties are common)."""
    if a.shape == b.shape and (a == b).all():
        return "identical"
    diff = [int(np.argmax(x != y)) if (x != y).any() else None for x, y in zip(a, b)]
    same = sum(d is None for d in diff)
    firsts = sorted(d for d in diff if d is not None)
    return f"{same}/{len(a)} rows identical; others first differ at token {firsts}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.generation_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", choices=("torch", "mlx"))
    ap.add_argument("--batch", action="append", type=int)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads: 1 on a machine others load "
                    "(torch's threads wait for one another, and a busy core stalls them all)")
    args = ap.parse_args(argv)
    names, batches = args.backend or ["torch", "mlx"], args.batch or [1, 8]

    if "torch" in names:
        # before the MLX backend: the BLAS it loads process-wide (before mlx.core) otherwise takes over
        # symbols torch calls, and torch decodes 2.3x slower (measured here: 99 vs 43 ms per token)
        import torch  # noqa: F401
    if "mlx" in names:
        from gptspec.backends import get

        get("mlx")  # before anything imports mlx.core: it loads the optimised BLAS
    spec, params = gpt2_weights()
    contenders: dict[str, Run] = {}
    tmp = tempfile.TemporaryDirectory()
    versions = []
    for name in names:
        contenders[f"gptspec-{name}"] = gptspec_run(name, spec, params)
        if name == "torch":
            import torch
            import transformers

            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)

            contenders["HF transformers"] = hf_run(spec, params, tmp.name)
            versions.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                            f"transformers {transformers.__version__}")
        else:
            import mlx.core as mx
            import mlx_lm

            contenders["mlx-lm"] = mlx_lm_run(spec, params)
            versions.append(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    print(f"{'; '.join(versions)}; {os.cpu_count()} CPUs")
    print(f"GPT-2 124M, synthetic weights, float32, greedy: {args.prompt}-token prompts, {args.new} new tokens; "
          f"best of {args.repeat} rounds after a warm-up\n")

    results: list[Result] = []
    for batch in batches:
        prompts = inputs(spec, batch, args.prompt, seed=batch)[0].tolist()
        for run in contenders.values():
            run(prompts, 2)  # warm-up: allocations, first-call setup
        best: dict[str, Result] = {}
        order = list(contenders)
        for r in range(args.repeat):
            for name in order[r % len(order):] + order[:r % len(order)]:
                prefill, decode, tokens = contenders[name](prompts, args.new)
                res = Result(name, batch, prefill, decode, tokens)
                if name not in best or prefill + decode < best[name].prefill_s + best[name].decode_s:
                    best[name] = res
        results += best.values()
        peers = {"gptspec-torch": "HF transformers", "gptspec-mlx": "mlx-lm"}
        for ours, peer in peers.items():
            if ours in best and peer in best:
                print(f"batch {batch}: {ours} vs {peer} greedy tokens: {agreement(best[ours].tokens, best[peer].tokens)}")

    print()
    header = ("contender", "batch", "prefill (s)", "prompt tokens/s", "decode (s)", "decode tokens/s")
    rows = [(r.name, str(r.batch), f"{r.prefill_s:.3f}", f"{r.batch * args.prompt / r.prefill_s:.0f}",
             f"{r.decode_s:.3f}", f"{r.batch * (args.new - 1) / r.decode_s:.1f}") for r in results]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
