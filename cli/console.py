"""The console every command prints to, and the progress displays the long commands share.

On a terminal: rich's live displays. Anywhere else (CI logs, pipes, files): plain lines only, no
live display and no ANSI escapes, so that a log reads like a transcript.
"""
from __future__ import annotations

import time

from rich.console import Console

console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the conformance table
    console = Console(width=180)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class Streamed:
    """A long job's progress: on a terminal a live line (what runs now, how many of how many are
    done, the time elapsed) under the results streamed so far; elsewhere only the results, one
    plain line each, prefixed with the count done and the time elapsed.

        with Streamed(total=12) as stream:
            stream.start("torch on test-tiny float32")
            stream.result("pass torch ...")          # one result done (advance=False: not counted)
            stream.show(table)                        # anything else to print between the lines
    """

    def __init__(self, total: int | None, what: str = "results"):
        self.total, self.what, self.done = total, what, 0
        self.began = time.perf_counter()
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
                TimeElapsedColumn

            counts = MofNCompleteColumn() if total is not None else TextColumn("{task.completed} " + what)
            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), counts,
                                TimeElapsedColumn(), console=console, transient=True)
            self.task = self.bar.add_task("starting", total=total)

    def __enter__(self) -> "Streamed":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def start(self, text: str) -> None:
        """What runs now (shown live on a terminal; not logged elsewhere)."""
        if self.bar:
            self.bar.update(self.task, description=text)

    def result(self, markup: str, advance: bool = True) -> None:
        """One line for a finished result (rich markup)."""
        if advance:
            self.done += 1
            if self.bar:
                self.bar.update(self.task, completed=self.done)
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        console.print(f"[dim]\\[{count} {_clock(time.perf_counter() - self.began)}][/dim] {markup}",
                      highlight=False, soft_wrap=True)

    def show(self, renderable) -> None:
        console.print(renderable)


class ConvertProgress:
    """Progress bars on a terminal (per tensor where the format reports it); silent in logs and pipes."""

    def __init__(self):
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
        self.tasks = {}

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    @property
    def report(self):
        """The per-tensor callback the readers and writers take, or None when silent."""
        return self._bytes if self.bar else None

    def _bytes(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total)

    def step(self, task: str, run):
        """A step with no per-tensor report: an indeterminate bar while it runs."""
        tid = self.bar.add_task(task, total=None) if self.bar else None
        result = run()
        if self.bar:
            self.bar.update(tid, total=1, completed=1)
        return result
