"""`gptspec conformance` and its actions: run the suite here, record artifacts, compare them,
run the negative controls."""
from __future__ import annotations

import argparse
import errno
import os
import platform

from ..spec import DTYPES, PRESETS, InputError, WeightsError
from ..weights.atomic import atomic_write
from .console import Streamed, check_output, console


def _suite(args, weights: str | None) -> list:
    """The tier's cases for the chosen variants, narrowed by --only."""
    from ..conformance import cases

    suite = cases(args.tier, weights, args.variant or ["gpt2"])
    if args.only:
        suite = [c for c in suite if c.preset in args.only or c.weights in args.only]
    return suite


# The training precision (SPEC.md 20.9) each --dtype selects: float16 trains in none.
_PRECISION_OF_DTYPE = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def _precisions(args) -> list[str]:
    from ..spec.train import PRECISIONS

    if not args.dtype:
        return list(PRECISIONS)
    return [p for p in PRECISIONS if p in {_PRECISION_OF_DTYPE.get(d) for d in args.dtype}]


def _trajectory_suite(args) -> list:
    """The tier's trajectory cases for the chosen variants, narrowed by --only and by the precisions
    the dtypes select; none with --no-training."""
    from ..conformance.trajectory import trajectory_cases

    if getattr(args, "no_training", False):
        return []
    precisions = set(_precisions(args))
    suite = trajectory_cases(args.tier, args.variant or ["gpt2"])
    return [c for c in suite if (not args.only or c.preset in args.only) and precisions & set(c.precisions)]


def _nothing_matched(args) -> InputError:
    from ..conformance import cases

    variants = args.variant or ["gpt2"]
    sizes = sorted({c.preset for c in cases(args.tier, None, variants)}, key=list(PRESETS).index)
    only = f"--only {' --only '.join(args.only)} " if args.only else ""
    return InputError(
        f"the selection matches no case: {only}in tier {args.tier} for variant {', '.join(variants)}; "
        f"the sizes there are {', '.join(sizes) or 'none'}"
        + ("" if args.tier == "heavy" else " (--tier heavy has more)"))


def _real_weights(args, synthetic_suite) -> tuple[str | None, str | None]:
    """The real weights for the gpt2 case and their name: --weights, else 'gpt2' where it resolves.
    Looked up (and its absence reported) only when the selection holds GPT-2 at the gpt2 size."""
    from ..weights import resolve

    if args.weights == "none":
        return None, None
    if args.weights is not None:
        return args.weights, args.weights
    if not any(c.preset == "gpt2" and c.variant == "gpt2" for c in synthetic_suite):
        return None, None
    try:
        return str(resolve.locate("gpt2")), "gpt2"
    except WeightsError as e:
        console.print(f"[yellow]Real GPT-2 weights not found, so the gpt2 case uses SYNTHETIC "
                      f"weights of the same shapes.[/yellow]\n[dim]{e}[/dim]")
        return None, None


def _check_weights_given(args) -> None:
    """--weights names something that exists, whether or not the selection reaches its case: a typo
    is an error, never silently ignored."""
    from ..weights import resolve

    given = getattr(args, "weights", None)
    if given is None or given == "none":
        return
    if os.path.exists(given):
        return
    if resolve.names_a_path(given):
        raise WeightsError(f"--weights {given}: no such file or directory")
    resolve.locate(given)  # a name: where it was looked for, if nowhere


def _selection(args):
    """The backends, cases and dtypes the options choose (shared by run and record), and the name
    of the real weights in the suite (None when synthetic only); None when no backend is installed.
    A selection that matches no case is an InputError."""
    from .. import backends as registry

    _check_weights_given(args)
    synthetic = _suite(args, None)
    training = bool(_trajectory_suite(args))
    if not synthetic and not training and args.weights in (None, "none"):  # before the backends: no backend needed to say so
        raise _nothing_matched(args)
    names = args.backend or registry.available()
    if not names:
        console.print("[red]no backend is installed[/red]: pip install 'gptspec[torch]' (or [mlx], [tinygrad])")
        for name, why in registry.status().items():
            console.print(f"  {name}: {why}")
        return None
    chosen = [registry.get(n) for n in names]  # unknown or unusable names fail here, clearly
    weights, weights_name = _real_weights(args, synthetic)
    suite = _suite(args, weights) if weights is not None else synthetic
    if not suite and not training:
        raise _nothing_matched(args)
    return chosen, suite, args.dtype or list(DTYPES), weights_name


def cmd_conformance(args) -> int:
    from ..conformance import run
    from ..conformance.generation import generation_cases
    from ..conformance.report import details, generation_table, summary, table, to_json, trajectory_table

    if args.json:
        check_output(args.json, make_parents=False)  # before the suite, not after it
    selection = _selection(args)
    if selection is None:
        return 2
    chosen, suite, dtypes, _ = selection
    precisions = _precisions(args)
    training = [(c, p) for c in _trajectory_suite(args) for p in precisions if p in c.precisions]
    versions = ", ".join(b.version() for b in chosen)
    generating = [] if args.no_generation else generation_cases(suite, large=args.tier == "heavy")
    console.print(f"gptspec conformance: {versions}; {len(suite)} cases x {len(dtypes)} dtypes, tier {args.tier}"
                  + (f"; generation on {len(generating)} of the cases" if generating else "")
                  + (f"; {len(training)} training trajectories" if training else ""))
    # pairs are shown, not counted
    total = ((len(suite) + len(generating)) * len(dtypes) + len(training)) * len(chosen)

    with Streamed(total) as stream:
        def on_start(case_id: str, subject: str, dtype: str) -> None:
            stream.start(f"{subject} on {case_id} {dtype}")

        def on_outcome(o) -> None:
            stream.result(summary(o), advance="~" not in o.subject)
            if o.status == "ran" and (args.verbose or not o.ok):
                stream.show(details(o, only_failures=not args.verbose))

        outcomes = run(chosen, suite, dtypes, device=args.device, pairwise=not args.no_pairwise,
                       on_outcome=on_outcome, on_start=on_start, generation=generating, training=training)
    if any(o.kind == "model" for o in outcomes):
        console.print(table(outcomes))
    if any(o.kind == "generation" for o in outcomes):
        console.print(generation_table(outcomes))
    if any(o.kind == "trajectory" for o in outcomes):
        console.print(trajectory_table(outcomes))
    if args.json:
        env = {"python": platform.python_version(), "platform": platform.platform(), "backends": versions}
        with atomic_write(args.json) as tmp:
            tmp.write_text(to_json(outcomes, env))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        console.print(f"[red]{len(failed)} of {len(outcomes)} results failed[/red]")
        return 1
    gaps = [o for o in outcomes if o.status != "ran"]
    note = f" ({len(gaps)} not run: see the table)" if gaps else ""
    console.print(f"[green]all {len(outcomes) - len(gaps)} results within tolerance{note}[/green]")
    return 0


def cmd_conformance_record(args) -> int:
    from ..conformance import crossmachine

    check_output(args.out, directory=not str(args.out).endswith(".safetensors"))
    selection = _selection(args)
    if selection is None:
        return 2
    chosen, suite, dtypes, weights_name = selection
    precisions = _precisions(args)
    training = [(c, p) for c in _trajectory_suite(args) for p in precisions if p in c.precisions]
    console.print(f"gptspec conformance record: {', '.join(b.version() for b in chosen)}; "
                  f"{len(suite)} cases x {len(dtypes)} dtypes"
                  + (f", {len(training)} training trajectories" if training else "") + f" -> {args.out}")

    def show(r):
        if r.status == "written":
            console.print(f"[green]wrote[/green] {r.path} ({r.backend}, {r.device}, {r.dtype}, {r.seconds:.1f}s)")
        else:
            color = "red" if r.status == "error" else "yellow"
            console.print(f"[{color}]{r.status}[/{color}]: {r.backend} {r.device} {r.dtype} {r.case}: {r.message}")

    results = crossmachine.record(chosen, suite, dtypes, args.out, device=args.device, weights_name=weights_name,
                                  on_result=show, trajectories=training)
    written = [r for r in results if r.status == "written"]
    errors = [r for r in results if r.status == "error"]
    console.print(f"{len(written)} artifacts written to {args.out}; {len(errors)} errors, "
                  f"{len(results) - len(written) - len(errors)} not run")
    return 1 if errors or not written else 0


def cmd_conformance_compare(args) -> int:
    from ..conformance import artifact_file, crossmachine
    from ..conformance.report import details, table, trajectory_table, write_artifact_report

    if args.report:
        check_output(args.report, directory=True)
    missing = [f for f in args.files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(errno.ENOENT, "no such artifact file or directory", missing[0])
    paths = artifact_file.expand(args.files)
    if not paths:
        console.print(f"[red]no artifacts[/red] in {', '.join(args.files)}")
        return 2
    weights = [args.weights] if isinstance(args.weights, str) else (args.weights or [])  # given before 'compare'
    result = crossmachine.compare(paths, weights=[w for w in weights if w != "none"])
    title = f"gptspec conformance compare: {len(paths)} artifacts"
    if any(o.kind == "model" for o in result.outcomes):
        console.print(table(result.outcomes, title=title))
    if any(o.kind == "trajectory" for o in result.outcomes):
        console.print(trajectory_table(result.outcomes, title=f"{title}: training trajectories"))
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


def _control_line(r) -> str:
    flagged = {"flagged": "[green]flagged[/green]", "MISSED": "[red]MISSED[/red]"}.get(
        r.verdict, f"[yellow]{r.verdict} (effect / bound {r.effect_ratio:.2g})[/yellow]")
    correct = "the correct model passes" if r.correct_ok else "[red]the correct model FAILS[/red]"
    found = f"{r.message}" if r.message else f"worst error/bound {r.worst_ratio:.3g} ({r.worst_tensor or '-'})"
    return f"{flagged} {r.name} ({r.variant}, {r.case}, {r.dtype}): {found}; {correct}"


def cmd_conformance_controls(args) -> int:
    """SPEC.md 9's negative controls: each deliberately broken model must be flagged (its worst
    error/bound ratio shown), and the correct model beside it must pass."""
    from ..conformance.controls import run_controls, selected, table as controls_table

    dtypes = getattr(args, "dtype", None) or ["float32"]
    pairs = [p for d in dtypes for p in selected(args.variant, args.only, d)]
    if not pairs:
        every = selected()
        given = "".join(f" --variant {v}" for v in args.variant or []) + "".join(f" --only {p}" for p in args.only or [])
        raise InputError(f"no negative control matches{given}; controls exist for the variants "
                         f"{', '.join(sorted({c.variant for c, _ in every}))} on the sizes "
                         f"{', '.join(sorted({case.preset for _, case in every}))}")
    console.print(f"gptspec conformance controls: {len(pairs)} broken torch models that the suite must flag "
                  f"({', '.join(dtypes)}, cpu)")
    with Streamed(len(pairs)) as stream:
        results = [r for d in dtypes for r in run_controls(
            variants=args.variant, cases=args.only, dtype=d, on_result=lambda r: stream.result(_control_line(r)),
            on_start=lambda case_id, subject, dtype: stream.start(f"{subject} on {case_id} {dtype}"))]
    console.print(controls_table(results))
    missed = [r for r in results if r.verdict == "MISSED"]
    broken = [r for r in results if not r.correct_ok]
    if missed or broken:
        console.print(f"[red]{len(missed)} of {len(results)} controls missed; the correct model failed "
                      f"beside {len(broken)}[/red]")
        return 1
    below = [r for r in results if not r.flagged]
    console.print(f"[green]{len(results) - len(below)} of {len(results)} controls flagged"
                  + (f", {len(below)} below their dtype's resolution (effect / bound shown)" if below else "")
                  + ", the correct models within tolerance[/green]")
    return 0


def _suite_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The options that choose backends, cases and dtypes (`conformance` and `conformance record`)."""
    p.add_argument("--backend", action="append", help="restrict to this backend (repeatable)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="restrict to this dtype (repeatable)")
    p.add_argument("--device", help="device for every backend (default: each backend's best)")
    p.add_argument("--tier", choices=("default", "heavy"), default=argparse.SUPPRESS if suppress else "default")
    p.add_argument("--weights", help="real weights for the gpt2 case (name or path; 'none' for synthetic only). "
                                     "Default: 'gpt2' when it resolves")
    p.add_argument("--no-training", action="store_true",
                   help="leave out the training trajectories (N optimizer steps of each backend against the float64 "
                        "reference, SPEC.md 20.11; --dtype float32 trains in float32, bfloat16 in mixed_bfloat16, "
                        "float16 in none)")
    _case_options(p)


def _case_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", action="append", metavar="NAME",
                   help="run the suite on this variant (repeatable; 'gptspec variants' lists them; default gpt2)")
    p.add_argument("--only", action="append", metavar="PRESET", choices=list(PRESETS),
                   help="run only the cases of this model size (repeatable), e.g. --only test-tiny")


def add_parsers(sub) -> None:
    c = sub.add_parser("conformance", help="check every installed backend against the reference",
                       description="Without an action: run the suite here (with generation through each "
                                   "backend's KV cache). 'record' writes portable artifacts of the runs, "
                                   "'compare' checks artifacts (from any machines) against one another and "
                                   "the reference, 'controls' runs the negative controls.")
    _suite_options(c)
    c.add_argument("--no-pairwise", action="store_true", help="skip backend-vs-backend checks")
    c.add_argument("--no-generation", action="store_true",
                   help="skip generation through each backend's KV cache (cached logits, greedy continuations; "
                        "by default on each variant's largest small model and on real weights; the heavy tier: "
                        "every model)")
    c.add_argument("--verbose", "-v", action="store_true", help="print every tensor's errors")
    c.add_argument("--json", help="also write every check to this JSON file")
    c.set_defaults(func=cmd_conformance)
    actions = c.add_subparsers(dest="action", metavar="{record,compare,controls}", required=False)
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
    ctl = actions.add_parser("controls", argument_default=argparse.SUPPRESS,
                             help="run the negative controls: broken models the suite must flag (SPEC.md 9)")
    _case_options(ctl)
    ctl.add_argument("--dtype", action="append", choices=DTYPES,
                     help="run the controls in this dtype (repeatable; default float32). In bfloat16 and float16 "
                          "the half-precision controls join them; SPEC.md 9 says which bugs each dtype can resolve")
    ctl.set_defaults(func=cmd_conformance_controls)
