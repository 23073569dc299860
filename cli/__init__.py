"""The `gptspec` command (also `python -m gptspec`): one module per command family.

    conformance.py  conformance [record | compare | controls]
    weights.py      info, convert, synthetic
    generate.py     generate, stats
    backends.py     backends, variants
    data.py         data prepare, info, llmc
    train.py        train, runs compare, runs check
    recipes.py      recipe list, run, check
    evaluate.py     eval hellaswag
    console.py      the shared console and progress displays
"""
from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from ..spec import BackendError, InputError, SpecError, WeightsError
from . import backends, conformance, data, evaluate, generate, recipes, train, weights
from .conformance import cmd_conformance, cmd_conformance_compare, cmd_conformance_controls, cmd_conformance_record
from .console import console

__all__ = ["main", "parser", "cmd_conformance", "cmd_conformance_record", "cmd_conformance_compare",
           "cmd_conformance_controls"]


EXIT_CODES = """exit status:
  0  the command ran and every check passed
  1  the command ran and a check failed (a conformance mismatch, a control not flagged)
  2  the command could not run: bad input or usage, an unreadable or hostile file, an output path
     that cannot be written (said in one line, before any long work where it can be known)
  130  interrupted (Ctrl-C); no half-written file is left behind"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptspec", description="GPT-2 specified once, proven in every framework.",
                                 epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for family in (conformance, backends, weights, generate, data, evaluate, train, recipes):
        family.add_parsers(sub)
    return ap


def main(argv=None) -> int:
    """Run one command: its own exit status (0 passed, 1 a check failed), 2 when it could not run
    (gptspec's errors and the operating system's, printed as one line without a traceback), 130 when
    interrupted."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, WeightsError, InputError, BackendError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    except OSError as e:  # a path that cannot be read or written: missing, read-only, a directory
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[red]error:[/red] {escape(where + str(e.strerror or e))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
