"""Rendering outcomes: a rich table for people, JSON for machines (and for cross-machine runs)."""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Iterable

from rich.console import Console
from rich.table import Table

from .metrics import Check, ratio as _ratio
from .runner import Outcome


def _cell(check: Check | None, named: bool = True) -> str:
    if check is None:
        return "-"
    if check.note:
        return f"[red]{check.tensor}: {check.note}[/red]"
    l2 = _ratio(check.rel_l2, check.bound_l2) >= _ratio(check.rel_max, check.bound_max)
    err, bnd = (check.rel_l2, check.bound_l2) if l2 else (check.rel_max, check.bound_max)
    color = "green" if check.ok else "red"
    name = "" if check.tensor in ("logits", "loss") or not named else f" {check.tensor}"
    return f"[{color}]{err:.1e}[/{color}] / {_bound(bnd)}{name}"


def _bound(b: float) -> str:
    # a policy bound is a round number (5e-06); a conditioned one (c u kappa, SPEC.md 9) is not
    return f"{b:.0e}" if float(f"{b:.0e}") == b else f"{b:.1e}"


def _kappa(c: Check) -> str:
    return "-" if c.kappa_l2 != c.kappa_l2 else f"{c.kappa_l2:.3g} / {c.kappa_max:.3g}"


def _status(o: Outcome) -> str:
    if o.status == "ran":
        return "[green]pass[/green]" if o.ok else f"[red]FAIL ({len(o.failures)})[/red]"
    if o.status == "error":
        return "[red]ERROR[/red]"
    return f"[yellow]{o.status}[/yellow]"


def table(outcomes: Iterable[Outcome], title: str = "gptspec conformance") -> Table:
    """The forward, loss and gradient rows (generation_table shows the generation rows)."""
    t = Table(title=title, caption="cells: worst error / its bound (relative; see SPEC.md 'Tolerance policy')")
    for col in ("case", "weights", "backend", "device", "dtype", "logits", "loss", "grads (worst tensor)", "time", "result"):
        t.add_column(col, no_wrap=True)
    for o in outcomes:
        if o.kind != "model":
            continue
        t.add_row(
            o.case, "[yellow]SYNTHETIC[/yellow]" if o.synthetic else "real", o.subject, o.device,
            o.dtype, _cell(o.worst("logits")), _cell(o.worst("loss")), _cell(o.worst("grads")),
            f"{o.seconds:.1f}s" if o.seconds else "", _status(o),
        )
    return t


def _greedy_cell(o: Outcome) -> str:
    if not o.verdicts:
        return "-"
    return "; ".join(f"[green]{v}[/green]" if v.ok else f"[red]{v}[/red]" for v in o.verdicts)


def generation_table(outcomes: Iterable[Outcome], title: str = "gptspec conformance: generation (KV cache)") -> Table:
    """The generation rows: cached logits against the whole sequence's, greedy continuations."""
    t = Table(title=title, caption="cached logits: worst error / its bound; greedy: the continuations compared "
                                   "(a first difference passes only at a near-tie of the reference)")
    for col in ("case", "weights", "backend", "device", "dtype", "cached logits", "greedy", "time", "result"):
        t.add_column(col, no_wrap=True)
    for o in outcomes:
        if o.kind != "generation":
            continue
        t.add_row(
            o.case, "[yellow]SYNTHETIC[/yellow]" if o.synthetic else "real", o.subject, o.device, o.dtype,
            _cell(o.worst("logits"), named=False), _greedy_cell(o), f"{o.seconds:.1f}s" if o.seconds else "",
            _status(o),
        )
    return t


def trajectory_table(outcomes: Iterable[Outcome],
                     title: str = "gptspec conformance: training trajectories") -> Table:
    """The training rows (kind "trajectory"): per quantity the worst error / bound at step 1 and step N."""
    from .trajectory import table as trajectory_rows

    return trajectory_rows(outcomes, title=title)


_KIND_SUFFIX = {"generation": " generation", "trajectory": " training"}


def summary(o: Outcome) -> str:
    """One line (rich markup) for an outcome as it streams: what ran, its result, and its worst
    error against its bound (or why it did not run)."""
    what = f"{o.subject} {o.case} {o.dtype}" + _KIND_SUFFIX.get(o.kind, "")
    if o.status != "ran":
        return f"{_status(o)} {what}: {o.message}"
    worst = max(o.checks, key=lambda c: c.worst_ratio, default=None)
    parts = [] if worst is None else [f"worst {_cell(worst)}" + ("" if worst.tensor not in ("logits", "loss")
                                                                  else f" {worst.tensor}")]
    parts += [f"greedy {_greedy_cell(o)}"] if o.verdicts else []
    time = f" ({o.seconds:.1f}s)" if o.seconds else ""
    return f"{_status(o)} {what}: {'; '.join(parts)}{time}"


def details(outcome: Outcome, only_failures: bool = False) -> Table:
    t = Table(title=f"{outcome.subject} on {outcome.case} ({outcome.dtype}, {outcome.device})")
    for col in ("tensor", "max abs", "rel l2", "bound", "rel max", "bound", "kappa (l2 / max)", "ok"):
        t.add_column(col)
    for c in outcome.checks:
        if only_failures and c.ok:
            continue
        t.add_row(c.tensor, f"{c.max_abs:.2e}", f"{c.rel_l2:.2e}", _bound(c.bound_l2), f"{c.rel_max:.2e}",
                  _bound(c.bound_max), _kappa(c), "[green]yes[/green]" if c.ok else f"[red]NO {c.note}[/red]")
    for v in outcome.verdicts:
        if only_failures and v.ok:
            continue
        t.add_row("greedy tokens", "", "", "", "", "", "", f"[green]yes: {v}[/green]" if v.ok else f"[red]NO: {v}[/red]")
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
            | {"kind": o.kind, "ok": o.ok, "checks": [c.as_dict() for c in o.checks]}
            | ({"greedy": [asdict(v) for v in o.verdicts]} if o.kind == "generation" else {})
            for o in outcomes
        ],
    }, indent=1)


# -- artifacts compared across machines (conformance/crossmachine.py) ---------------------------
PLOT_HINT = "the heatmap (PNG) needs matplotlib: pip install 'gptspec[plot]'"


def grid(outcomes: Iterable[Outcome]) -> dict[tuple[str, str], tuple[list[str], list[str], dict]]:
    """(case, dtype) -> (tensors, subjects, {(tensor, subject): Check}) over the outcomes that ran."""
    out: dict = {}
    for o in outcomes:
        if o.status != "ran":
            continue
        tensors, subjects, cells = out.setdefault((o.case, o.dtype), ([], [], {}))
        subjects.append(o.subject)
        for c in o.checks:
            if c.tensor not in tensors:
                tensors.append(c.tensor)
            cells[c.tensor, o.subject] = c
    return out


def _md_cell(c: Check | None) -> str:
    if c is None:
        return "-"
    if c.note:
        return f"**FAIL** {c.note}"
    err, bnd = (c.rel_l2, c.bound_l2) if _ratio(c.rel_l2, c.bound_l2) >= _ratio(c.rel_max, c.bound_max) \
        else (c.rel_max, c.bound_max)
    return f"{err:.1e} / {_bound(bnd)}" + ("" if c.ok else " **FAIL**")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in text)


def artifact_markdown(comparison, images: dict | None = None, plot_note: str = "") -> str:
    """The report of crossmachine.compare(): the artifacts, then per (case, dtype) a table of every
    tensor's worst error / its bound for each comparison, and its heatmap where one was drawn."""
    import json

    lines = ["# gptspec conformance: artifacts compared", "",
             f"Result: **{'PASS' if comparison.ok else 'FAIL'}**. Cells: the worst error / its bound (the "
             "tighter of rel_l2 and rel_max, SPEC.md section 9); `a~b` compares two artifacts with twice "
             "the bound. **FAIL** marks a check over its bound.", "",
             "| case | dtype | artifact | file | framework | machine | gptspec | recorded |",
             "|---|---|---|---|---|---|---|---|"]
    for a in comparison.artifacts:
        m, mach = a.meta, json.loads(a.meta.get("machine", "{}"))
        where = f"{mach.get('platform', '?')}, {mach.get('processor', '?')}, Python {mach.get('python', '?')}"
        lines.append(f"| {a.case} | {a.dtype} | {a.label} | `{a.path}` | {m.get('framework')} | {where} "
                     f"| {m.get('gptspec_version')} | {m.get('created', '')} |")
    lines += [""] + [f"> {n}" for n in comparison.notes] + ([""] if comparison.notes else [])
    if plot_note:
        lines += [f"> {plot_note}", ""]
    images = images or {}
    for (case, dtype), (tensors, subjects, cells) in grid(comparison.outcomes).items():
        first = next(a for a in comparison.artifacts if a.case == case)
        kind = "synthetic weights" if first.synthetic else "real weights"
        lines += [f"## {case}, {dtype}", "",
                  f"{kind}, checkpoint `{first.meta['fingerprint']}`, spec version {first.meta['spec_version']}", "",
                  "| tensor | " + " | ".join(subjects) + " |", "|---" * (len(subjects) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(_md_cell(cells.get((t, s))) for s in subjects) + " |" for t in tensors]
        if (case, dtype) in images:
            lines += ["", f"![error / bound, {case} {dtype}]({images[case, dtype]})"]
        lines.append("")
    return "\n".join(lines)


def write_artifact_report(comparison, directory) -> tuple[list, str]:
    """report.md and one heatmap PNG per (case, dtype) into `directory`; the paths written, and a
    note when the PNGs could not be drawn (matplotlib missing)."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, images, note = [], {}, ""
    try:
        from .heatmap import heatmap
    except ImportError:
        note = f"No heatmap: {PLOT_HINT}"
    else:
        for (case, dtype), (tensors, subjects, cells) in grid(comparison.outcomes).items():
            name = f"heatmap-{_slug(case)}-{dtype}.png"
            written.append(heatmap(directory / name, f"{case}, {dtype}", tensors, subjects, cells))
            images[case, dtype] = name
    md = directory / "report.md"
    md.write_text(artifact_markdown(comparison, images, note))
    return [md, *written], note
