"""`gptspec eval hellaswag`: multiple-choice accuracy (SPEC.md 23) of one backend, or of every installed
backend with the agreement table against the float64 reference (`--backend all`)."""
from __future__ import annotations

import json
import time

from ..spec import DTYPES, InputError
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from .console import Live, console, live_progress


class ExampleProgress(Live):
    """A bar over the examples of one run on a terminal; in logs and pipes a plain line at every tenth."""

    def __init__(self, total: int):
        self.total, self.began, self.logged = total, time.perf_counter(), 0
        self.what, self.correct = "", 0
        self.bar = live_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        if self.bar:
            self.task = self.bar.add_task("starting", total=total)

    def start(self, what: str) -> None:
        self.what, self.correct, self.began = what, 0, time.perf_counter()
        self.logged = 0
        if self.bar:
            self.bar.reset(self.task, total=self.total, description=what)

    def example(self, i: int, result) -> None:
        self.correct += result.pred_norm == result.example.label
        done = i + 1
        text = f"{self.what}: acc_norm {self.correct}/{done}"
        if self.bar:
            self.bar.update(self.task, completed=done, description=text)
        elif done * 10 // self.total > self.logged or done == self.total:
            self.logged = done * 10 // self.total
            console.print(f"[dim]{done}/{self.total} {time.perf_counter() - self.began:.1f} s[/dim] {text}",
                          highlight=False)


def _stderr(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _summary_line(name: str, dtype: str, device: str, result) -> str:
    cut = f", {result.truncated} context(s) truncated from the left" if result.truncated else ""
    return (f"{name} {dtype} on {device}: acc {result.acc:.4f} ± {_stderr(result.acc_stderr)}, acc_norm "
            f"{result.acc_norm:.4f} ± {_stderr(result.acc_norm_stderr)} ({result.n} examples{cut}; "
            f"{result.examples_per_s:.2f} examples/s)")


def _agreement_table(agreement):
    from rich.table import Table

    t = Table(title="multiple-choice agreement with the float64 reference (SPEC.md 23)",
              caption="same: examples with the same answer; near-ties: differing answers the reference cannot "
                      "separate within the logits bound; score: worst loss error / its bound")
    for col in ("subject", "dtype", "n", "same acc", "same acc_norm", "near-ties", "score", "verdict"):
        t.add_column(col, justify="right" if col not in ("subject", "dtype", "verdict") else "left")
    for r in agreement.rows:
        if r.status != "ran":
            t.add_row(r.subject, r.dtype, "", "", "", "", "", f"{r.status}: {r.message}")
            continue
        colour = "green" if r.ok else "red"
        t.add_row(r.subject, r.dtype, str(r.n), str(r.same["acc"]), str(r.same["acc_norm"]),
                  f"{r.near_ties['acc']} / {r.near_ties['acc_norm']}", f"{r.score_ratio:.2g}",
                  f"[{colour}]{r.verdict}[/{colour}]")
    return t


def _write(path: str, payload: dict) -> None:
    from ..weights.atomic import atomic_write

    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)


def cmd_eval_hellaswag(args) -> int:
    from .. import backends as registry
    from ..evaluation import evaluate, read_examples
    from ..evaluation.run import check_vocabulary
    from ..weights import load_checkpoint

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    examples = read_examples(args.data, args.limit)  # every line checked before a model is loaded
    ckpt = load_checkpoint(args.model)
    check_vocabulary(ckpt.spec)
    dtypes = args.dtype or ["float32"]
    header = {"task": "hellaswag", "data": str(args.data), "limit": args.limit, "model": ckpt.source,
              "weights": ckpt.describe(), "synthetic": ckpt.synthetic, "pad_multiple": args.pad_multiple}
    console.print(f"HellaSwag-style evaluation of {ckpt.describe()} on {len(examples)} examples of {args.data}",
                  highlight=False)
    if ckpt.synthetic:
        console.print("[yellow]SYNTHETIC weights: the accuracy is chance[/yellow]")

    if args.backend == "all":
        from ..conformance.multiple_choice import run_agreement

        names = registry.available()
        if not names:
            registry.get("torch")  # raises the error that says how to install one
        with ExampleProgress(len(examples)) as progress:
            agreement = run_agreement([registry.get(n) for n in names], ckpt.spec, ckpt.params, examples, dtypes,
                                      args.device, args.pad_multiple,
                                      on_start=lambda name, dtype: progress.start(f"{name} {dtype}"),
                                      on_example=progress.example)
        runs = []
        for dtype in dtypes:
            console.print(_summary_line("reference", dtype, "cpu (float64)", agreement.references[dtype]),
                          highlight=False)
            runs.append({"backend": "reference", "dtype": dtype, "device": "cpu (float64)",
                         **agreement.references[dtype].to_dict()})
        for row in agreement.rows:
            if (row.subject, row.dtype) in agreement.results:
                result = agreement.results[row.subject, row.dtype]
                console.print(_summary_line(row.subject, row.dtype, row.device, result), highlight=False)
                runs.append({"backend": row.subject, "version": registry.get(row.subject).version(),
                             "dtype": row.dtype, "device": row.device, **result.to_dict()})
        console.print(_agreement_table(agreement))
        for row in agreement.rows:
            for failure in row.failures:
                console.print(f"[red]{row.subject} {row.dtype}[/red] {failure}", highlight=False)
        if args.out:
            _write(args.out, {**header, "runs": runs, "agreement": [r.to_dict() for r in agreement.rows]})
        return 0 if agreement.ok else 1

    backend = registry.get(args.backend or (registry.available() or ["torch"])[0])
    runs = []
    with ExampleProgress(len(examples)) as progress:
        for dtype in dtypes:
            model = backend.build(ckpt.spec, ckpt.params, dtype, args.device)
            device = args.device or backend.devices()[0]
            progress.start(f"{backend.name} {dtype}")
            result = evaluate(backend, model, examples, pad_multiple=args.pad_multiple, on_example=progress.example)
            console.print(_summary_line(backend.name, dtype, device, result), highlight=False)
            runs.append({"backend": backend.name, "version": backend.version(), "dtype": dtype, "device": device,
                         **result.to_dict()})
    if args.out:
        _write(args.out, {**header, "runs": runs})
    return 0


def add_parsers(sub) -> None:
    from ..evaluation.run import PAD_MULTIPLE

    ev = sub.add_parser("eval", help="evaluate a model on a benchmark (HellaSwag-style multiple choice)")
    tasks = ev.add_subparsers(dest="task", required=True)
    h = tasks.add_parser("hellaswag", help="HellaSwag accuracy (acc, acc_norm) from a jsonl file you supply")
    h.add_argument("--backend", help="torch, mlx, tinygrad, or 'all': every installed backend against the float64 "
                                     "reference, with the agreement table (default: the first installed)")
    h.add_argument("--model", default="gpt2", help="a name, path or synthetic:<preset>[:seed] (default gpt2)")
    h.add_argument("--data", required=True, help="HellaSwag jsonl (e.g. hellaswag_val.jsonl); never downloaded")
    h.add_argument("--limit", type=int, help="the first N examples only")
    h.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable (default float32)")
    h.add_argument("--device")
    h.add_argument("--out", help="write the summary and per-example results to this JSON file")
    h.add_argument("--pad-multiple", type=int, default=PAD_MULTIPLE,
                   help=f"pad each batch to a multiple of this many positions (default {PAD_MULTIPLE}; "
                        "fewer shapes for compiling backends; never scored)")
    h.set_defaults(func=cmd_eval_hellaswag)
