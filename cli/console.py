"""The console every command prints to, the progress displays the long commands share, and the check
that an output path can be written before the work that fills it starts.

On a terminal: rich's live displays. Anywhere else (CI logs, pipes, files): plain lines only, no
live display and no ANSI escapes, so that a log reads like a transcript.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)

console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the conformance table
    console = Console(width=180)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def live_progress(*columns) -> Progress | None:
    """A transient rich Progress of these columns on a terminal; None in logs and pipes (plain lines there)."""
    return Progress(*columns, console=console, transient=True) if console.is_terminal else None


class Live:
    """Enters and leaves its `bar` (a live_progress, or None) with the owner's `with` block."""
    bar: Progress | None = None

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)


class Streamed(Live):
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
        counts = MofNCompleteColumn() if total is not None else TextColumn("{task.completed} " + what)
        self.bar = live_progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), counts,
                                 TimeElapsedColumn())
        if self.bar:
            self.task = self.bar.add_task("starting", total=total)

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


class ConvertProgress(Live):
    """Progress bars on a terminal (per tensor where the format reports it); silent in logs and pipes."""

    def __init__(self):
        self.bar = live_progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
        self.tasks = {}

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


# -- where commands write ---------------------------------------------------------------------
def check_output(path: str | os.PathLike, *, directory: bool = False, make_parents: bool = True) -> Path:
    """Fail now, before any long work, if `path` cannot be written: an OSError naming the path (the CLI
    prints it as one line and exits 2). `directory`: the path is a directory to write into, else a
    file; `make_parents`: missing directories on the way are made (the writers do), else the parent
    must exist. Checks what can be known in advance; a disk that fills later still fails later."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        if directory:
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(p))
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file to write", str(p))
    existing = p if (directory and p.exists()) else p.parent
    while not existing.exists():
        if not make_parents:
            raise FileNotFoundError(errno.ENOENT, "no such directory to write into", str(existing))
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is not a directory, so nothing can be written under it", str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(existing))
    return p
