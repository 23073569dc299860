"""`gptspec backends` and `variants`: what runs here, and which backend implements what."""
from __future__ import annotations

from .console import console


def cmd_backends(args) -> int:
    from .. import backends as registry

    for name, why in registry.status().items():
        if why is None:
            b = registry.get(name)
            console.print(f"[green]{name}[/green]: {b.version()}; devices {', '.join(b.devices())}")
        else:
            console.print(f"[yellow]{name}[/yellow]: {why}")
    return 0


def cmd_variants(args) -> int:
    from rich.table import Table

    from .. import backends as registry
    from ..spec import ModelSpec
    from ..spec.variants import VARIANTS

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


def add_parsers(sub) -> None:
    b = sub.add_parser("backends", help="list backends and whether they run here")
    b.set_defaults(func=cmd_backends)

    va = sub.add_parser("variants", help="list the variants and which backends implement them")
    va.set_defaults(func=cmd_variants)
