"""The `gptspec` command (also `python -m gptspec`)."""
from __future__ import annotations

import argparse
import platform
import sys

from rich.console import Console

from .spec import DTYPES, PRESETS, BackendError, InputError, SpecError, WeightsError

console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the conformance table
    console = Console(width=180)


def _selection(args):
    """The backends, cases and dtypes the options choose (shared by run and record), and the name
    of the real weights in the suite (None when synthetic only); None when no backend is installed."""
    from . import backends as registry
    from .conformance import cases
    from .weights import resolve

    names = args.backend or registry.available()
    if not names:
        console.print("[red]no backend is installed[/red]: pip install 'gptspec[torch]' (or [mlx], [tinygrad])")
        for name, why in registry.status().items():
            console.print(f"  {name}: {why}")
        return None
    chosen = [registry.get(n) for n in names]  # unknown or unusable names fail here, clearly
    weights = weights_name = args.weights
    if weights is None:
        try:
            weights, weights_name = str(resolve.locate("gpt2")), "gpt2"
        except WeightsError as e:
            console.print(f"[yellow]Real GPT-2 weights not found, so the gpt2 case uses SYNTHETIC "
                          f"weights of the same shapes.[/yellow]\n[dim]{e}[/dim]")
    elif weights == "none":
        weights = weights_name = None
    suite = cases(args.tier, weights, args.variant or ["gpt2"])
    if args.only:
        suite = [c for c in suite if c.preset in args.only or c.weights in args.only]
    return chosen, suite, args.dtype or list(DTYPES), weights_name


def cmd_conformance(args) -> int:
    from .conformance import run
    from .conformance.report import details, table, to_json

    selection = _selection(args)
    if selection is None:
        return 2
    chosen, suite, dtypes, _ = selection
    versions = ", ".join(b.version() for b in chosen)
    console.print(f"gptspec conformance: {versions}; {len(suite)} cases x {len(dtypes)} dtypes, tier {args.tier}")

    def progress(o):
        if args.verbose or not o.ok:
            console.print(details(o) if o.status == "ran" else f"{o.subject} {o.case} {o.dtype}: {o.status} {o.message}")

    with console.status("running...") as status:
        def on_outcome(o):
            status.update(f"ran {o.subject} on {o.case} in {o.dtype}")
            progress(o)

        outcomes = run(chosen, suite, dtypes, device=args.device, pairwise=not args.no_pairwise,
                       on_outcome=on_outcome)
    console.print(table(outcomes))
    if args.json:
        env = {"python": platform.python_version(), "platform": platform.platform(), "backends": versions}
        with open(args.json, "w") as f:
            f.write(to_json(outcomes, env))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        console.print(f"[red]{len(failed)} of {len(outcomes)} results failed[/red]")
        return 1
    gaps = [o for o in outcomes if o.status != "ran"]
    note = f" ({len(gaps)} not run: see the table)" if gaps else ""
    console.print(f"[green]all {len(outcomes) - len(gaps)} results within tolerance{note}[/green]")
    return 0


def cmd_conformance_record(args) -> int:
    from .conformance import artifacts

    selection = _selection(args)
    if selection is None:
        return 2
    chosen, suite, dtypes, weights_name = selection
    console.print(f"gptspec conformance record: {', '.join(b.version() for b in chosen)}; "
                  f"{len(suite)} cases x {len(dtypes)} dtypes -> {args.out}")

    def show(r):
        if r.status == "written":
            console.print(f"[green]wrote[/green] {r.path} ({r.backend}, {r.device}, {r.dtype}, {r.seconds:.1f}s)")
        else:
            color = "red" if r.status == "error" else "yellow"
            console.print(f"[{color}]{r.status}[/{color}]: {r.backend} {r.device} {r.dtype} {r.case}: {r.message}")

    results = artifacts.record(chosen, suite, dtypes, args.out, device=args.device, weights_name=weights_name,
                               on_result=show)
    written = [r for r in results if r.status == "written"]
    errors = [r for r in results if r.status == "error"]
    console.print(f"{len(written)} artifacts written to {args.out}; {len(errors)} errors, "
                  f"{len(results) - len(written) - len(errors)} not run")
    return 1 if errors or not written else 0


def cmd_conformance_compare(args) -> int:
    from .conformance import artifacts
    from .conformance.report import details, table, write_artifact_report

    paths = artifacts.expand(args.files)
    if not paths:
        console.print(f"[red]no artifacts[/red] in {', '.join(args.files)}")
        return 2
    weights = [args.weights] if isinstance(args.weights, str) else (args.weights or [])  # given before 'compare'
    result = artifacts.compare(paths, weights=[w for w in weights if w != "none"])
    console.print(table(result.outcomes, title=f"gptspec conformance compare: {len(paths)} artifacts"))
    for o in result.outcomes:
        if o.status == "ran" and not o.ok:
            console.print(details(o, only_failures=True))
    for note in result.notes:
        console.print(f"[yellow]{note}[/yellow]", highlight=False)
    if args.report:
        written, note = write_artifact_report(result, args.report)
        console.print(f"report: {', '.join(map(str, written))}")
        if note:
            console.print(f"[yellow]{note}[/yellow]")
    ran = [o for o in result.outcomes if o.status == "ran"]
    if not result.ok:
        console.print(f"[red]{sum(not o.ok for o in result.outcomes)} of {len(ran)} comparisons failed[/red]")
        return 1
    if not ran:
        console.print("[red]nothing was compared[/red] (no reference here and no two artifacts of one case and dtype)")
        return 1
    console.print(f"[green]all {len(ran)} comparisons within tolerance[/green]")
    return 0


def cmd_backends(args) -> int:
    from . import backends as registry

    for name, why in registry.status().items():
        if why is None:
            b = registry.get(name)
            console.print(f"[green]{name}[/green]: {b.version()}; devices {', '.join(b.devices())}")
        else:
            console.print(f"[yellow]{name}[/yellow]: {why}")
    return 0


def cmd_variants(args) -> int:
    from rich.table import Table

    from . import backends as registry
    from .spec import ModelSpec
    from .spec.variants import VARIANTS

    usable = {n: registry.get(n) for n in registry.available()}
    table = Table(title="gptspec variants (gptspec conformance --variant NAME)")
    for col in ("variant", "what it is", "SPEC.md", "fields", *usable):
        table.add_column(col)
    for v in VARIANTS.values():
        spec = v.apply(ModelSpec.preset("test-mini"))
        marks = ["[red]not implemented[/red]" if b.unsupported(spec) else "[green]yes[/green]" for b in usable.values()]
        fields = ", ".join(f"{k}={val}" for k, val in v.changes.items()) or "(defaults)"
        table.add_row(v.name, v.summary, f"section {v.section}", fields, *marks)
    console.print(table)
    return 0


def cmd_info(args) -> int:
    from .weights import load_checkpoint

    ckpt = load_checkpoint(args.source)
    console.print(ckpt.describe())
    console.print(ckpt.spec.to_json())
    return 0


CONVERT_FORMATS = ("canonical", "hf", "nanogpt", "llmc")
_CONVERT_SUFFIXES = {".safetensors": "canonical", ".pt": "nanogpt", ".pth": "nanogpt", ".ckpt": "nanogpt",
                     ".bin": "llmc"}


def convert_format(dest: str) -> str:
    """The format DEST's name asks for: .safetensors canonical, .pt nanoGPT, .bin llm.c, a directory HF."""
    import os
    from pathlib import Path

    path = Path(dest)
    if path.is_dir() or dest.endswith(("/", os.sep)) or not path.suffix:
        return "hf"
    if path.suffix in _CONVERT_SUFFIXES:
        return _CONVERT_SUFFIXES[path.suffix]
    raise WeightsError(
        f"{dest}: cannot tell the output format from its name (.safetensors: canonical, .pt: nanoGPT, "
        f".bin: llm.c, a directory: Hugging Face); name it so or give --to {{{','.join(CONVERT_FORMATS)}}}"
    )


class _ConvertProgress:
    """Progress bars on a terminal (per tensor where the format reports it); silent in logs and pipes."""

    def __init__(self):
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
        self.tasks = {}

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    @property
    def report(self):
        """The per-tensor callback the readers and writers take, or None when silent."""
        return self._bytes if self.bar else None

    def _bytes(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total)

    def step(self, task: str, run):
        """A step with no per-tensor report: an indeterminate bar while it runs."""
        tid = self.bar.add_task(task, total=None) if self.bar else None
        result = run()
        if self.bar:
            self.bar.update(tid, total=1, completed=1)
        return result


def cmd_convert(args) -> int:
    from .weights import load_checkpoint, save, write_hf, write_llmc, write_nanogpt

    fmt = args.to or convert_format(args.dest)
    with _ConvertProgress() as bars:
        ckpt = load_checkpoint(args.source, progress=bars.report)
        dtype = args.dtype or (ckpt.stored_dtype if ckpt.stored_dtype in DTYPES else "float32")
        if fmt == "llmc" and not args.dtype and dtype == "float16":
            dtype = "float32"  # llm.c holds float32 or bfloat16; widening float16 is exact
        common = dict(synthetic=ckpt.synthetic)
        if fmt == "hf":
            bars.step(f"writing {args.dest}", lambda: write_hf(args.dest, ckpt.spec, ckpt.params, dtype, **common))
        elif fmt == "canonical":
            bars.step(f"writing {args.dest}", lambda: save(args.dest, ckpt.spec, ckpt.params, dtype,
                                                           origin=ckpt.source, **common))
        elif fmt == "nanogpt":
            write_nanogpt(args.dest, ckpt.spec, ckpt.params, dtype, origin=ckpt.source, progress=bars.report,
                          **common)
        else:
            write_llmc(args.dest, ckpt.spec, ckpt.params, dtype, progress=bars.report, **common)
    console.print(f"wrote {args.dest} ({fmt}, {dtype}) from {ckpt.describe()}")
    return 0


def cmd_synthetic(args) -> int:
    from .spec import ModelSpec
    from .weights import save, synthetic_params, write_hf

    from .spec.variants import get_variant

    spec = get_variant(args.variant).apply(ModelSpec.preset(args.preset))
    params = synthetic_params(spec, args.seed, args.init)
    if args.to == "hf":
        write_hf(args.dest, spec, params, args.dtype, synthetic=True)
    else:
        save(args.dest, spec, params, args.dtype, synthetic=True,
             origin=f"synthetic:{args.preset}:{args.seed} ({args.init} init)")
    console.print(f"wrote SYNTHETIC {args.preset} weights ({args.init} init, seed {args.seed}) to {args.dest}")
    return 0


def _suite_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The options that choose backends, cases and dtypes (`conformance` and `conformance record`)."""
    p.add_argument("--backend", action="append", help="restrict to this backend (repeatable)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="restrict to this dtype (repeatable)")
    p.add_argument("--device", help="device for every backend (default: each backend's best)")
    p.add_argument("--tier", choices=("default", "heavy"), default=argparse.SUPPRESS if suppress else "default")
    p.add_argument("--weights", help="real weights for the gpt2 case (name or path; 'none' for synthetic only). "
                                     "Default: 'gpt2' when it resolves")
    p.add_argument("--variant", action="append", metavar="NAME",
                   help="run the suite on this variant (repeatable; 'gptspec variants' lists them; default gpt2)")
    p.add_argument("--only", action="append", metavar="PRESET", choices=list(PRESETS),
                   help="run only the cases of this model size (repeatable), e.g. --only test-tiny")


def _prompt(args, ckpt) -> tuple[list[int], object]:
    """The ids of args.prompt (GPT-2 tokenizer; empty: <|endoftext|>) or of --ids, and the encoding (None for --ids)."""
    from .spec.sampling import EOT

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
    from .tokenizer import get_encoding

    enc = get_encoding("gpt2")
    return enc.encode(args.prompt or "", allowed_special={"<|endoftext|>"}) or [EOT], enc


def cmd_stats(args) -> int:
    """SPEC.md 18.4, seed 002's "SIZE COMPARISON": per-layer sizes of the residual stream for a text."""
    from pathlib import Path

    import numpy as np
    from rich.table import Table

    from .spec import reference
    from .spec.checks import check_tokens_array
    from .weights import load_checkpoint

    ckpt = load_checkpoint(args.model)
    ids, _ = _prompt(args, ckpt)
    tokens = np.array([ids], dtype=np.int64)
    check_tokens_array(ckpt.spec, tokens)
    if args.backend in (None, "reference"):
        if args.dtype or args.device:
            raise InputError("--dtype and --device choose a backend's precision and device; the reference is float64")
        stats, where = reference.residual_stats(ckpt.spec, ckpt.params, tokens), "the float64 reference"
    else:
        from . import backends as registry

        backend = registry.get(args.backend)
        model = backend.build(ckpt.spec, ckpt.params, args.dtype or "float32", args.device)
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

        Path(args.json).write_text(json.dumps({k: v.tolist() for k, v in stats.items()}, indent=1))
    if ckpt.synthetic:
        console.print("[yellow]SYNTHETIC weights[/yellow]")
    return 0


def cmd_generate(args) -> int:
    """Stream a continuation of a prompt (SPEC.md 12): the text (or ids) on stdout, the rest on stderr."""
    import codecs
    import time

    from . import backends as registry
    from .backends.generation import steps
    from .spec.sampling import EOT, Sampling
    from .weights import load_checkpoint

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    names = [args.backend] if args.backend else registry.available()
    backend = registry.get(names[0] if names else "torch")  # none installed: the error says how to install
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    backend.check_supported(ckpt.spec)
    model = backend.build(ckpt.spec, ckpt.params, args.dtype or "float32", args.device)
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
    for k, step in enumerate(steps(backend, model, spec, [prompt] * n, args.max_new_tokens, sampling, stop)):
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptspec", description="GPT-2 specified once, proven in every framework.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("conformance", help="check every installed backend against the reference",
                       description="Without an action: run the suite here. 'record' writes portable artifacts "
                                   "of the runs, 'compare' checks artifacts (from any machines) against one "
                                   "another and the reference.")
    _suite_options(c)
    c.add_argument("--no-pairwise", action="store_true", help="skip backend-vs-backend checks")
    c.add_argument("--verbose", "-v", action="store_true", help="print every tensor's errors")
    c.add_argument("--json", help="also write every check to this JSON file")
    c.set_defaults(func=cmd_conformance)
    actions = c.add_subparsers(dest="action", metavar="{record,compare}", required=False)
    # options left out after the action keep what was given before it (SUPPRESS: no default of their own)
    r = actions.add_parser("record", argument_default=argparse.SUPPRESS,
                           help="run the suite's cases and write one artifact per backend, device, dtype, case")
    _suite_options(r, suppress=True)
    r.add_argument("--out", required=True, help="a directory (or one .safetensors file for a single artifact)")
    r.set_defaults(func=cmd_conformance_record)
    cmp = actions.add_parser("compare", argument_default=argparse.SUPPRESS,
                             help="compare artifacts with one another and with the float64 reference")
    cmp.add_argument("files", nargs="+", help="artifact files, or directories holding them")
    cmp.add_argument("--report", default=None, help="write report.md and heatmap PNGs into this directory")
    cmp.add_argument("--weights", action="append", metavar="PATH",
                     help="where else to look for the real weights an artifact names (repeatable)")
    cmp.set_defaults(func=cmd_conformance_compare)

    b = sub.add_parser("backends", help="list backends and whether they run here")
    b.set_defaults(func=cmd_backends)

    va = sub.add_parser("variants", help="list the variants and which backends implement them")
    va.set_defaults(func=cmd_variants)

    i = sub.add_parser("info", help="describe a weights file, directory or name")
    i.add_argument("source")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="convert weights between the canonical, Hugging Face, nanoGPT and llm.c formats")
    v.add_argument("source", help="a name, file or directory (canonical, Hugging Face, nanoGPT ckpt.pt, llm.c .bin)")
    v.add_argument("dest")
    v.add_argument("--to", choices=CONVERT_FORMATS,
                   help="output format (default: from DEST: .safetensors canonical, .pt nanoGPT, .bin llm.c, "
                        "a directory Hugging Face)")
    v.add_argument("--dtype", choices=DTYPES)
    v.set_defaults(func=cmd_convert)

    s = sub.add_parser("synthetic", help="write deterministic synthetic weights")
    s.add_argument("preset", choices=list(PRESETS))
    s.add_argument("dest")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--init", choices=("gpt2", "conformance"), default="gpt2")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--variant", default="gpt2", help="architecture variant (gptspec variants); "
                                                    "variants other than gpt2 need --to canonical")
    s.add_argument("--to", choices=("canonical", "hf"), default="hf")
    s.set_defaults(func=cmd_synthetic)

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
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, one batch")
    g.add_argument("--ids", help="the prompt as token ids '1,2,3' (printed as ids): for models without "
                                 "GPT-2's vocabulary")
    g.set_defaults(func=cmd_generate)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, WeightsError, InputError, BackendError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
