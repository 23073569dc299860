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


def cmd_conformance(args) -> int:
    from . import backends as registry
    from .conformance import cases, run
    from .conformance.report import details, table, to_json
    from .weights import resolve

    names = args.backend or registry.available()
    if not names:
        console.print("[red]no backend is installed[/red]: pip install 'gptspec[torch]' (or [mlx], [tinygrad])")
        for name, why in registry.status().items():
            console.print(f"  {name}: {why}")
        return 2
    chosen = [registry.get(n) for n in names]  # unknown or unusable names fail here, clearly
    weights = args.weights
    if weights is None:
        try:
            weights = str(resolve.locate("gpt2"))
        except WeightsError as e:
            console.print(f"[yellow]Real GPT-2 weights not found, so the gpt2 case uses SYNTHETIC "
                          f"weights of the same shapes.[/yellow]\n[dim]{e}[/dim]")
    elif weights == "none":
        weights = None
    suite = cases(args.tier, weights)
    if args.only:
        suite = [c for c in suite if c.preset in args.only or c.weights in args.only]
    dtypes = args.dtype or list(DTYPES)
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


def cmd_backends(args) -> int:
    from . import backends as registry

    for name, why in registry.status().items():
        if why is None:
            b = registry.get(name)
            console.print(f"[green]{name}[/green]: {b.version()}; devices {', '.join(b.devices())}")
        else:
            console.print(f"[yellow]{name}[/yellow]: {why}")
    return 0


def cmd_info(args) -> int:
    from .weights import load_checkpoint

    ckpt = load_checkpoint(args.source)
    console.print(ckpt.describe())
    console.print(ckpt.spec.to_json())
    return 0


def cmd_convert(args) -> int:
    from .weights import load_checkpoint, save, write_hf

    ckpt = load_checkpoint(args.source)
    dtype = args.dtype or ckpt.stored_dtype
    if args.to == "hf":
        write_hf(args.dest, ckpt.spec, ckpt.params, dtype, synthetic=ckpt.synthetic)
    else:
        save(args.dest, ckpt.spec, ckpt.params, dtype, synthetic=ckpt.synthetic, origin=ckpt.source)
    console.print(f"wrote {args.dest} ({args.to}, {dtype}) from {ckpt.describe()}")
    return 0


def cmd_synthetic(args) -> int:
    from .spec import ModelSpec
    from .weights import save, synthetic_params, write_hf

    spec = ModelSpec.preset(args.preset)
    params = synthetic_params(spec, args.seed, args.init)
    if args.to == "hf":
        write_hf(args.dest, spec, params, args.dtype, synthetic=True)
    else:
        save(args.dest, spec, params, args.dtype, synthetic=True,
             origin=f"synthetic:{args.preset}:{args.seed} ({args.init} init)")
    console.print(f"wrote SYNTHETIC {args.preset} weights ({args.init} init, seed {args.seed}) to {args.dest}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptspec", description="GPT-2 specified once, proven in every framework.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("conformance", help="check every installed backend against the reference")
    c.add_argument("--backend", action="append", help="restrict to this backend (repeatable)")
    c.add_argument("--dtype", action="append", choices=DTYPES, help="restrict to this dtype (repeatable)")
    c.add_argument("--device", help="device for every backend (default: each backend's best)")
    c.add_argument("--tier", choices=("default", "heavy"), default="default")
    c.add_argument("--weights", help="real weights for the gpt2 case (name or path; 'none' for synthetic only). "
                                     "Default: 'gpt2' when it resolves")
    c.add_argument("--only", action="append", metavar="PRESET", choices=list(PRESETS),
                   help="run only the cases of this model size (repeatable), e.g. --only test-tiny")
    c.add_argument("--no-pairwise", action="store_true", help="skip backend-vs-backend checks")
    c.add_argument("--verbose", "-v", action="store_true", help="print every tensor's errors")
    c.add_argument("--json", help="also write every check to this JSON file")
    c.set_defaults(func=cmd_conformance)

    b = sub.add_parser("backends", help="list backends and whether they run here")
    b.set_defaults(func=cmd_backends)

    i = sub.add_parser("info", help="describe a weights file, directory or name")
    i.add_argument("source")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="convert weights between canonical and Hugging Face layouts")
    v.add_argument("source", help="a name, file or directory")
    v.add_argument("dest")
    v.add_argument("--to", choices=("canonical", "hf"), default="canonical")
    v.add_argument("--dtype", choices=DTYPES)
    v.set_defaults(func=cmd_convert)

    s = sub.add_parser("synthetic", help="write deterministic synthetic weights")
    s.add_argument("preset", choices=list(PRESETS))
    s.add_argument("dest")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--init", choices=("gpt2", "conformance"), default="gpt2")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--to", choices=("canonical", "hf"), default="hf")
    s.set_defaults(func=cmd_synthetic)
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
