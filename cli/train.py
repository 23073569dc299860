"""`gptspec train` (a training run in any backend, with checkpoints and exact resume) and
`gptspec runs compare` (their losses side by side). The loop is gptspec.runs; this module parses,
displays and maps the outcome to an exit status (0 done, 1 diverged, 130 stopped by Ctrl-C)."""
from __future__ import annotations

import argparse
import math

from ..spec import InputError
from .console import console

EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 130
_TRAIN_FIELDS = {"lr": "lr", "min_lr_ratio": "min_lr_ratio", "warmup": "warmup_steps", "max_steps": "max_steps",
                 "schedule": "schedule", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
                 "grad_accum": "grad_accum", "precision": "precision", "seed": "seed"}
_SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
_RUN_FIELDS = ("backend", "device", "compile", "steps", "eval_interval", "eval_iters", "ckpt_interval",
               "log_interval", "sample_tokens", "hellaswag", "hellaswag_limit", "devices", "fsdp", "batch_size", "block_size", "variant", "model", "data")


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class Display:
    """The run on the console: a rich progress bar with the step's numbers on a terminal; elsewhere a
    plain line every log_interval steps. Evaluations and notes are printed as lines in both."""

    def __init__(self):
        self.bar = None
        self.last_line = 0.0

    def begin(self, info) -> None:
        c, spec = info["config"], info["spec"]
        self.config, self.total = c, c.steps
        console.print(f"[bold]{info['backend']}[/bold] on {info['device']}: {info['origin']}; "
                      f"{spec.n_params:,} parameters ({spec.n_layer} layers, {spec.n_head} heads, {spec.n_embd} wide, "
                      f"vocab {spec.vocab_size}); run {info['run_dir']}", highlight=False)
        ts = c.train_spec
        console.print(f"data {c.data}: batch {c.batch_size} x block {c.block_size} x accum {ts.grad_accum} = "
                      f"{c.tokens_per_step:,} tokens/step; lr {ts.lr:g} ({ts.schedule}, warmup {ts.warmup_steps}, "
                      f"max_steps {ts.max_steps}), wd {ts.weight_decay:g}, clip {ts.grad_clip}, {ts.precision}; "
                      f"seed {ts.seed}; compile {info['compile']}", highlight=False)
        console.print(f"MFU: {info['flops_per_token'] / 1e6:.2f} MFLOP/token (6N + 12 L H Q T) against "
                      f"{info['peak'].source}", highlight=False)
        if info.get("world", "single process") != "single process":
            who = ("rank 0 logs and writes; every rank evaluates and takes part in checkpoints"
                   if "FSDP" in info["world"] else "rank 0 logs, evaluates and checkpoints")
            console.print(f"data parallel: {info['world']}; {who}; the loss is the mean over the ranks "
                          f"(docs/distributed.md)", highlight=False)
        if info["start_step"]:
            console.print(f"resuming at step {info['start_step']} of {c.steps}", highlight=False)
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=c.steps, completed=info["start_step"])

    def _numbers(self, r) -> str:
        mfu = "" if r["mfu"] is None else f" MFU {100 * r['mfu']:.2f}%"
        return (f"loss {_fmt(r['loss'])} lr {r['lr']:.3g} |g| {_fmt(r['grad_norm'], '.3g')} "
                f"{r['tokens_per_s']:,.0f} tok/s{mfu}")

    def step(self, r) -> None:
        if self.bar:
            self.bar.update(self.task, completed=r["step"], description=self._numbers(r))
        elif r["step"] % self.config.log_interval == 0 or r["step"] in (1, self.total):
            console.print(f"step {r['step']}/{self.total} {self._numbers(r)}", highlight=False)

    def evaluation(self, r) -> None:
        console.print(f"[bold]eval[/bold] step {r['step']}: val loss {_fmt(r['val_loss'])} (ppl "
                      f"{_fmt(r['val_ppl'], '.2f')}), {r['eval_time']:.1f} s", highlight=False)
        if r.get("hellaswag"):
            h = r["hellaswag"]
            console.print(f"[bold]hellaswag[/bold] ({h['n']} examples): acc {h['acc']:.4f} +- {_fmt(h['acc_stderr'])}, "
                          f"acc_norm {h['acc_norm']:.4f} +- {_fmt(h['acc_norm_stderr'])}", highlight=False)
        if r.get("sample") is not None:
            console.print(f"[dim]sample:[/dim] {r['sample']!r}", highlight=False, markup=True)

    def note(self, text: str) -> None:
        console.print(f"[yellow]{text}[/yellow]", highlight=False)

    def close(self) -> None:
        """Leave the live display (also when the run ends in an error)."""
        if self.bar:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def end(self, result) -> None:
        self.close()
        from rich.table import Table

        from ..runs.compare import summarize

        s = summarize(result.run_dir)
        t = Table(title=f"{result.run_dir}: {result.status}")
        for col in ("step", "train loss", "val loss", "val ppl (e^loss)", "tokens", "wall time", "backend"):
            t.add_column(col, justify="right")
        t.add_row(str(s.step), _fmt(s.train_loss), _fmt(s.val_loss), _fmt(s.val_ppl, ".2f"), f"{s.tokens:,}",
                  f"{s.wall_time:.1f} s", s.backend)
        console.print(t)
        color = {"done": "green", "interrupted": "yellow", "diverged": "red"}[result.status]
        console.print(f"[{color}]{result.message}[/{color}]", highlight=False)


def _overrides(args, names) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def cmd_train(args) -> int:
    display = Display()
    try:
        return _train(args, display)
    finally:
        display.close()


def _train(args, display: Display) -> int:
    from ..runs import RunConfig
    from ..runs.config import train_spec_from
    from ..runs.loop import resume_run, train_run

    train_overrides = {field: getattr(args, arg) for arg, field in _TRAIN_FIELDS.items()
                       if getattr(args, arg) is not None}
    sizes = _overrides(args, _SIZE_FIELDS)
    if args.resume:
        if args.out and args.out != args.resume:
            raise InputError(f"--resume {args.resume} continues that run in place; --out {args.out} names another "
                             "directory (leave --out out)")
        if args.train_preset:
            raise InputError("--train-preset chooses a new run's recipe; a resumed run keeps its own")
        if args.force:
            raise InputError("--force starts a run over; it cannot be combined with --resume")
        result = resume_run(args.resume, _overrides(args, _RUN_FIELDS), train_overrides=train_overrides,
                            sizes=sizes, observer=display)
    else:
        missing = [f"--{n}" for n in ("backend", "model", "data", "out") if not getattr(args, n)]
        if missing:
            raise InputError(f"a new run needs {', '.join(missing)} (or --resume RUN_DIR to continue one)")
        steps = args.steps
        ts = train_spec_from(args.train_preset, train_overrides, steps)
        if steps is None:
            if ts.max_steps is None:
                raise InputError("give --steps (the run's length): the TrainSpec has no max_steps to default to")
            steps = ts.max_steps
        run_fields = _overrides(args, _RUN_FIELDS)
        run_fields.update(steps=steps, train_spec=ts, sizes=sizes)
        result = train_run(RunConfig(**run_fields), args.out, force=args.force, observer=display)
    return {"done": 0, "interrupted": EXIT_INTERRUPTED, "diverged": EXIT_DIVERGED}[result.status]


def cmd_runs_compare(args) -> int:
    from rich.table import Table

    from ..runs.compare import ratio, summarize
    from ..runs.plot import plot_compare

    runs = [summarize(d) for d in args.runs]
    first = runs[0]
    t = Table(title="gptspec runs compare",
              caption="losses in nats per token; perplexity = e^loss (seed 001's 2^loss is the perplexity of a loss "
                      "in bits); ratios are each run's over the first run's: below 0.95 is seed 001's '5% better'")
    for col in ("run", "train loss", "val loss", "val ppl", "val loss / first", "val ppl / first", "steps",
                "tokens", "wall time", "backend", "variant", "model"):
        t.add_column(col, justify="left" if col in ("run", "backend", "variant", "model") else "right")
    for r in runs:
        t.add_row(str(r.run_dir), _fmt(r.train_loss), _fmt(r.val_loss), _fmt(r.val_ppl, ".3f"),
                  _fmt(ratio(r.val_loss, first.val_loss), ".4f"), _fmt(ratio(r.val_ppl, first.val_ppl), ".4f"),
                  str(r.step), f"{r.tokens:,}", f"{r.wall_time:.1f} s", r.backend, r.variant, r.model)
    console.print(t)
    png = plot_compare(args.runs, args.png, lambda text: console.print(f"[yellow]{text}[/yellow]"))
    if png:
        console.print(f"loss curves: {png}")
    return 0


def add_parsers(sub) -> None:
    tr = sub.add_parser("train", help="train a model on token shards in any backend (checkpoints, exact resume)",
                        description="Train from a preset (the spec's init law) or fine-tune a checkpoint on "
                                    "`gptspec data prepare` shards; --resume RUN_DIR continues a run exactly.")
    tr.add_argument("--backend", choices=("torch", "mlx", "tinygrad"))
    tr.add_argument("--model", help="a ModelSpec preset (test-tiny, test-mini, gpt2, ...) or any checkpoint")
    tr.add_argument("--variant", help="a variant of spec/variants.py, applied to a preset")
    for name in _SIZE_FIELDS:
        tr.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int,
                        help="resize the preset" + (" (default: the data's vocabulary)" if name == "vocab_size" else ""))
    tr.add_argument("--data", help="a shard directory (gptspec data prepare)")
    tr.add_argument("--out", help="the run directory (refused if it holds another run, unless --force)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last complete checkpoint")
    tr.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    tr.add_argument("--train-preset", help="a TrainSpec preset (nanogpt-shakespeare-char, ...); default "
                                           "torch.optim.AdamW's defaults at a constant lr")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--block-size", type=int)
    tr.add_argument("--grad-accum", type=int)
    tr.add_argument("--steps", type=int, help="optimizer steps of the run (default: the TrainSpec's max_steps)")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--min-lr-ratio", type=float)
    tr.add_argument("--warmup", type=int, help="warmup steps")
    tr.add_argument("--max-steps", type=int, help="the schedule's length (default: the preset's, or --steps)")
    tr.add_argument("--schedule", choices=("constant", "cosine"))
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--grad-clip", type=float)
    tr.add_argument("--precision", "--dtype", dest="precision",
                    help="float32 or mixed_bfloat16 (bfloat16 means mixed_bfloat16: float32 master weights)")
    tr.add_argument("--device")
    tr.add_argument("--devices", type=int, metavar="N",
                    help="tinygrad: data parallel over N devices in one process (torch: torchrun, mlx: mlx.launch; "
                         "docs/distributed.md)")
    tr.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                    help="torch under torchrun: shard the weights, gradients and AdamW state over the ranks with "
                         "FSDP2's fully_shard instead of DDP (docs/distributed.md)")
    tr.add_argument("--seed", type=int, help="the run's seed: initial weights, batches, samples")
    tr.add_argument("--eval-interval", type=int)
    tr.add_argument("--eval-iters", type=int)
    tr.add_argument("--ckpt-interval", type=int)
    tr.add_argument("--log-interval", type=int, help="plain progress lines every N steps (not on a terminal)")
    tr.add_argument("--sample-tokens", type=int, help="tokens of the text sample at each eval (0: none)")
    tr.add_argument("--hellaswag", metavar="FILE",
                    help="also score this HellaSwag jsonl at each eval (acc, acc_norm: SPEC.md 23, docs/evaluation.md)")
    tr.add_argument("--hellaswag-limit", type=int, metavar="N", help="only the first N examples of --hellaswag")
    tr.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the step (default: what measured faster, docs/training.md)")
    tr.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="training runs: compare, check")
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    cmp_ = rsub.add_parser("compare", help="final losses, perplexity and the ratio to the first run; loss curves")
    cmp_.add_argument("runs", nargs="+", help="run directories (the first is the baseline of the ratios)")
    cmp_.add_argument("--png", default="runs-compare.png", help="where to draw the loss curves (default %(default)s)")
    cmp_.set_defaults(func=cmd_runs_compare)
    from .recipes import CHECK_DESCRIPTION, CHECK_HELP, add_check_arguments

    add_check_arguments(rsub.add_parser("check", help=CHECK_HELP, description=CHECK_DESCRIPTION))
