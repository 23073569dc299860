"""Rendering outcomes: a rich table for people, JSON for machines (and for cross-machine runs)."""
from __future__ import annotations

import io
import json
from typing import Iterable

from rich.console import Console
from rich.table import Table

from .metrics import Check
from .runner import Outcome


def _cell(check: Check | None) -> str:
    if check is None:
        return "-"
    if check.note:
        return f"[red]{check.tensor}: {check.note}[/red]"
    l2 = check.rel_l2 / check.bound_l2 >= check.rel_max / check.bound_max
    err, bnd = (check.rel_l2, check.bound_l2) if l2 else (check.rel_max, check.bound_max)
    color = "green" if check.ok else "red"
    name = "" if check.tensor in ("logits", "loss") else f" {check.tensor}"
    return f"[{color}]{err:.1e}[/{color}] / {bnd:.0e}{name}"


def _status(o: Outcome) -> str:
    if o.status == "ran":
        return "[green]pass[/green]" if o.ok else f"[red]FAIL ({len(o.failures)})[/red]"
    if o.status == "error":
        return "[red]ERROR[/red]"
    return f"[yellow]{o.status}[/yellow]"


def table(outcomes: Iterable[Outcome], title: str = "gptspec conformance") -> Table:
    t = Table(title=title, caption="cells: worst error / its bound (relative; see SPEC.md 'Tolerance policy')")
    for col in ("case", "weights", "backend", "device", "dtype", "logits", "loss", "grads (worst tensor)", "time", "result"):
        t.add_column(col, no_wrap=True)
    for o in outcomes:
        t.add_row(
            o.case, "[yellow]SYNTHETIC[/yellow]" if o.synthetic else "real", o.subject, o.device,
            o.dtype, _cell(o.worst("logits")), _cell(o.worst("loss")), _cell(o.worst("grads")),
            f"{o.seconds:.1f}s" if o.seconds else "", _status(o),
        )
    return t


def details(outcome: Outcome, only_failures: bool = False) -> Table:
    t = Table(title=f"{outcome.subject} on {outcome.case} ({outcome.dtype}, {outcome.device})")
    for col in ("tensor", "max abs", "rel l2", "bound", "rel max", "bound", "ok"):
        t.add_column(col)
    for c in outcome.checks:
        if only_failures and c.ok:
            continue
        t.add_row(c.tensor, f"{c.max_abs:.2e}", f"{c.rel_l2:.2e}", f"{c.bound_l2:.0e}", f"{c.rel_max:.2e}",
                  f"{c.bound_max:.0e}", "[green]yes[/green]" if c.ok else f"[red]NO {c.note}[/red]")
    return t


def failure_text(outcomes: Iterable[Outcome]) -> str:
    """Plain text of every failure (for pytest messages)."""
    console = Console(width=160, record=True, file=io.StringIO())
    for o in outcomes:
        if o.status == "error":
            console.print(f"{o.subject} on {o.case} ({o.dtype}, {o.device}) raised: {o.message}")
        elif not o.ok:
            console.print(details(o, only_failures=True))
    return console.export_text()


def to_json(outcomes: Iterable[Outcome], environment: dict) -> str:
    return json.dumps({
        "environment": environment,
        "outcomes": [
            {k: getattr(o, k) for k in ("case", "subject", "device", "dtype", "status", "message", "seconds", "synthetic")}
            | {"ok": o.ok, "checks": [c.as_dict() for c in o.checks]}
            for o in outcomes
        ],
    }, indent=1)
