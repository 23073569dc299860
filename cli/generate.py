"""`gptspec generate` (a continuation streamed through the KV cache) and `gptspec stats` (seed 002's
SIZE COMPARISON of the residual stream): the commands that run a model on a prompt."""
from __future__ import annotations

import sys

from rich.console import Console

from ..spec import DTYPES, InputError
from .console import check_output, console
from .weights import seed


def _prompt(args, ckpt) -> tuple[list[int], object]:
    """The ids of args.prompt (GPT-2 tokenizer; empty: <|endoftext|>) or of --ids, and the encoding (None for --ids)."""
    from ..spec.sampling import EOT

    if args.ids is not None:
        if args.prompt:
            raise InputError("give the prompt either as text or as --ids, not both")
        try:
            return [int(t) for t in args.ids.replace(",", " ").split()], None
        except ValueError:
            raise InputError(f"--ids must be integers separated by commas, got {args.ids!r}") from None
    if ckpt.spec.vocab_size < 50257:
        raise InputError(f"{ckpt.source} has a vocabulary of {ckpt.spec.vocab_size} ids, not GPT-2's 50257, so "
                         "the GPT-2 tokenizer cannot be used: give the prompt as --ids 1,2,3 (ids are printed)")
    from ..tokenizer import get_encoding

    enc = get_encoding("gpt2")
    return enc.encode(args.prompt or "", allowed_special={"<|endoftext|>"}) or [EOT], enc


def cmd_stats(args) -> int:
    """SPEC.md 18.4, seed 002's "SIZE COMPARISON": per-layer sizes of the residual stream for a text."""
    import numpy as np
    from rich.table import Table

    from ..spec import reference
    from ..spec.checks import check_tokens_array
    from ..weights import load_checkpoint

    if args.json:
        check_output(args.json, make_parents=False)
    ckpt = load_checkpoint(args.model)
    ids, _ = _prompt(args, ckpt)
    tokens = np.array([ids], dtype=np.int64)
    check_tokens_array(ckpt.spec, tokens)
    if args.backend in (None, "reference"):
        if args.dtype or args.device:
            raise InputError("--dtype and --device choose a backend's precision and device; the reference is float64")
        stats, where = reference.residual_stats(ckpt.spec, ckpt.params, tokens), "the float64 reference"
    else:
        from .. import backends as registry

        backend = registry.get(args.backend)
        model = backend.load(ckpt, dtype=args.dtype or "float32", device=args.device)
        stats, where = backend.residual_stats(model, tokens), f"{backend.version()}, {args.dtype or 'float32'}"
    table = Table(title=f"SIZE COMPARISON: {ckpt.describe()}; {len(ids)} tokens; {where}",
                  caption="mean over positions of the std over channels (ddof=1); seed 002's prev = output, "
                          "next = normed (SPEC.md 18.4)")
    table.add_column("layer", justify="right")
    for key in stats:
        table.add_column(key, justify="right")
    for layer in range(ckpt.spec.n_layer):
        table.add_row(str(layer), *(f"{stats[k][layer]:.6g}" for k in stats))
    console.print(table)
    if args.json:
        import json

        from ..weights.atomic import atomic_write

        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps({k: v.tolist() for k, v in stats.items()}, indent=1))
    if ckpt.synthetic:
        console.print("[yellow]SYNTHETIC weights[/yellow]")
    return 0


def cmd_generate(args) -> int:
    """Stream a continuation of a prompt (SPEC.md 12): the text (or ids) on stdout, the rest on stderr."""
    import codecs
    import time

    from .. import backends as registry
    from ..backends import generation
    from ..spec.sampling import EOT, Sampling
    from ..weights import load_checkpoint

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    names = [args.backend] if args.backend else registry.available()
    backend = registry.get(names[0] if names else "torch")  # none installed: the error says how to install
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    model = backend.load(ckpt, dtype=args.dtype or "float32", device=args.device)
    spec, load_s = ckpt.spec, time.perf_counter() - t0
    text = args.ids is None
    prompt, enc = _prompt(args, ckpt)
    sampling = Sampling(args.temperature, args.top_k or None, args.top_p, args.seed)
    err.print(f"{backend.version()}, {args.dtype or 'float32'}: {ckpt.describe()}; loaded in {load_s:.2f} s")
    if ckpt.synthetic:
        err.print("[yellow]SYNTHETIC weights: the text is noise[/yellow]")

    n = args.num_samples
    if n < 1:
        raise InputError(f"--num-samples must be >= 1, got {n}")
    stream = n == 1
    out = [[] for _ in range(n)]
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]

    def piece(i: int, token: int) -> str:  # a token's bytes may end inside a UTF-8 character: buffer them
        return decoders[i].decode(enc.decode_single_token_bytes(token)) if text else f" {token}"

    if stream:
        sys.stdout.write(enc.decode(prompt) if text else ",".join(map(str, prompt)) + " ->")
        sys.stdout.flush()
    stop = EOT if EOT < spec.vocab_size else None
    start, first, count = time.perf_counter(), None, 0
    for k, step in enumerate(generation.steps(backend, model, spec, [prompt] * n, args.max_new_tokens, sampling,
                                              stop)):
        if k == 0:
            first = time.perf_counter()  # the prefill and the first tokens chosen from its logits
        else:
            count += int(step.sampled.sum())  # each later step ran one decoding call
        for i in map(int, step.sampled.nonzero()[0]):
            tok = int(step.tokens[i])
            if tok == stop:
                continue
            out[i].append(piece(i, tok))
            if stream:
                sys.stdout.write(out[i][-1])
                sys.stdout.flush()
    end = time.perf_counter()
    tails = [d.decode(b"", final=True) if text else "" for d in decoders]
    if stream:
        sys.stdout.write(tails[0] + "\n")
    else:
        for i in range(n):
            sys.stdout.write(f"--- sample {i + 1} of {n} ---\n" + (enc.decode(prompt) if text else
                             ",".join(map(str, prompt)) + " ->") + "".join(out[i]) + tails[i] + "\n")
    sys.stdout.flush()
    first = first or end
    decode_s = end - first
    err.print(f"prompt: {len(prompt)} tokens x {n} in {first - start:.3f} s "
              f"({len(prompt) * n / max(first - start, 1e-9):.1f} tokens/s); decode: {count} tokens in "
              f"{decode_s:.3f} s ({count / decode_s if decode_s > 0 else 0:.1f} tokens/s)")
    return 0


def add_parsers(sub) -> None:
    st = sub.add_parser("stats", help="per-layer sizes of the residual stream for a text (seed 002's SIZE COMPARISON)")
    st.add_argument("prompt", nargs="?", default="", help="the text (empty: <|endoftext|>)")
    st.add_argument("--model", default="gpt2", help="a name, path or synthetic:<preset>[:seed] (default gpt2)")
    st.add_argument("--ids", help="the input as token ids '1,2,3', for models without GPT-2's vocabulary")
    st.add_argument("--backend", help="reference (default, float64), torch, mlx or tinygrad")
    st.add_argument("--dtype", choices=DTYPES)
    st.add_argument("--device")
    st.add_argument("--json", help="also write the statistics to this JSON file")
    st.set_defaults(func=cmd_stats)

    g = sub.add_parser("generate", help="continue a prompt with a KV cache, streaming the text")
    g.add_argument("prompt", nargs="?", default="", help="the text to continue (empty: from <|endoftext|>)")
    g.add_argument("--backend", help="torch, mlx, ... (default: the first installed)")
    g.add_argument("--model", default="gpt2", help="a name, path or synthetic:<preset>[:seed] (default gpt2)")
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--device")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=50, help="0: off")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=seed, default=0, help="a non-negative integer (default 0)")
    g.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, one batch")
    g.add_argument("--ids", help="the prompt as token ids '1,2,3' (printed as ids): for models without "
                                 "GPT-2's vocabulary")
    g.set_defaults(func=cmd_generate)
