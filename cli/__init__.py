"""The `gptspec` command (also `python -m gptspec`): one module per command family.

    conformance.py  conformance [record | compare | controls]
    weights.py      info, convert, synthetic
    generate.py     generate, stats
    backends.py     backends, variants
    console.py      the shared console and progress displays
"""
from __future__ import annotations

import argparse
import sys

from ..spec import BackendError, InputError, SpecError, WeightsError
from . import backends, conformance, generate, weights
from .conformance import cmd_conformance, cmd_conformance_compare, cmd_conformance_controls, cmd_conformance_record
from .console import console

__all__ = ["main", "parser", "cmd_conformance", "cmd_conformance_record", "cmd_conformance_compare",
           "cmd_conformance_controls"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptspec", description="GPT-2 specified once, proven in every framework.")
    sub = ap.add_subparsers(dest="command", required=True)
    for family in (conformance, backends, weights, generate):
        family.add_parsers(sub)
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
