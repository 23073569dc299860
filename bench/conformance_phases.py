"""Where `gptspec conformance` spends its time: per backend, case size and phase, one run per tree.

    python -m bench.conformance_phases [--against /path/to/other/checkout] [--json out.json] [-- conformance options]

Runs the command in-process (its own options after `--`, e.g. `-- --only test-mini`; `{run}` in them
becomes "this" or "other", e.g. `-- --json /tmp/{run}.json` to compare the two runs' checks), with a timer
around each backend method the runner calls (build, forward, loss_and_grads, residual_stats,
normalize, state, extend, train_step) and around the float64 reference, the comparisons, and the
generation and training rows; then prints seconds per (subject, case size, phase), the wall time,
the CPU time (user + system) of the process and of its worker processes, the process's peak resident
memory and the peak of all its processes together. Timed phases nest (a generation row calls
extend), so the table lists each on its own rather than summing them. tinygrad's runs happen in
worker processes by default (conformance/workers.py), where nothing is timed: the table shows the
main process's wait for them ("workers", "wait"); GPTSPEC_CONFORMANCE_WORKERS=0 times tinygrad's
own phases in-process.
With --against, the other tree runs first, in a fresh process as this one is, so that both meet
the same machine load (it is imported as `gptspec` through PYTHONPATH, a folder holding a
`gptspec` link to it). Benchmarks measure; they never assert.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

BACKEND_METHODS = ("build", "forward", "loss_and_grads", "residual_stats", "normalize", "state", "extend",
                   "train_step")
# (module, function, subject): phases outside the backends; a name a tree lacks is skipped
MODULE_PHASES = (
    ("conformance.runner", "reference_run", "reference"),
    ("conformance.runner", "compare_runs", "compare"),
    ("conformance.generation", "run_generation", "generation rows"),
    ("conformance.trajectory", "run_trajectory", "training rows"),
)


def _tree_rss_kib(root: int) -> int:
    """Resident memory of `root` and every process below it (Linux /proc; 0 elsewhere)."""
    children: dict[int, list[int]] = defaultdict(list)
    rss: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry.name)
        children[int(fields.get("PPid", "0"))].append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class _TreePeak:
    """The peak of _tree_rss_kib(this process), sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.5):
        self.peak_kib, self._interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(os.getpid()))
            self._stop.wait(self._interval)

    def __enter__(self) -> "_TreePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(argv: list[str]) -> dict:
    """In this process: `gptspec conformance argv` with every phase timed."""
    from gptspec import cli
    from gptspec.backends.base import Backend

    totals: dict[tuple[str, str, str], float] = defaultdict(float)
    current = {"size": "-"}

    def size_of(obj) -> str:
        spec = getattr(obj, "spec", None)
        return f"L{spec.n_layer}xC{spec.n_embd}" if spec is not None else current["size"]

    def timed(fn, subject_of, phase):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            subject, size = subject_of(args)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[(subject, size, phase)] += time.perf_counter() - start
        for name in ("cache_clear", "cache_info"):  # an lru_cache keeps its handles
            if hasattr(fn, name):
                setattr(wrapper, name, getattr(fn, name))
        return wrapper

    for name in BACKEND_METHODS:
        if hasattr(Backend, name):
            setattr(Backend, name, timed(getattr(Backend, name),
                                         lambda a: (a[0].name, size_of(a[1]) if len(a) > 1 else "-"), name))
    for module_name, fn_name, subject in MODULE_PHASES:
        module = importlib.import_module(f"gptspec.{module_name}")
        if hasattr(module, fn_name):
            def subject_of(a, subject=subject):
                case = next((x for x in a if hasattr(x, "preset")), None)
                if case is not None and subject == "reference":
                    current["size"] = size_of(case)
                return subject, size_of(case) if case is not None else current["size"]
            setattr(module, fn_name, timed(getattr(module, fn_name), subject_of, fn_name))

    workers = importlib.import_module("gptspec.conformance.runner").__dict__.get("workers")
    if workers is not None:  # a tree with worker processes: the main process's wait for their runs
        workers.Offload.take = timed(workers.Offload.take, lambda a: ("workers", size_of(a[1][1])), "wait")

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, once they have ended
        return r.ru_utime + r.ru_stime

    start, cpu0, child0 = time.perf_counter(), time.process_time(), children_cpu()
    with _TreePeak() as tree:
        code = cli.main(["conformance", *argv])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"exit": code, "wall_s": wall, "cpu_s": cpu, "workers_cpu_s": children_cpu() - child0,
            "peak_rss_mib": peak_kib / 1024, "tree_peak_rss_mib": tree.peak_kib / 1024,
            "phases": [[s, z, p, t] for (s, z, p), t in sorted(totals.items())]}


def _child(tree: str | None, argv: list[str]) -> dict:
    argv = [a.replace("{run}", "other" if tree else "this") for a in argv]
    env = dict(os.environ)
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as link_dir:
        os.symlink(os.path.abspath(tree) if tree else here, Path(link_dir) / "gptspec")
        env["PYTHONPATH"] = link_dir + os.pathsep + str(here)  # gptspec from the tree, bench from here
        code = (f"import json, sys; from bench.conformance_phases import measure; "
                f"r = measure({argv!r}); print('RESULT', json.dumps(r), file=sys.stderr)")
        proc = subprocess.run([sys.executable, "-c", code], cwd=link_dir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"gptspec conformance in {tree or 'this tree'} failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(prog="python -m bench.conformance_phases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default=None, help="another checkout to run first, in its own process")
    ap.add_argument("--json", default=None, help="write both runs' numbers here")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    runs = {}
    if args.against:
        runs["other"] = _child(args.against, passthrough)
    runs["this"] = _child(None, passthrough)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))

    from rich.console import Console
    from rich.table import Table

    names = list(runs)
    table = Table(title="gptspec conformance " + " ".join(passthrough) + ": seconds per phase")
    for col in ("subject", "size", "phase", *names):
        table.add_column(col)
    keys = dict.fromkeys(tuple(row[:3]) for r in runs.values() for row in r["phases"])
    by_run = {n: {tuple(row[:3]): row[3] for row in r["phases"]} for n, r in runs.items()}
    for key in keys:
        table.add_row(*key, *(f"{by_run[n][key]:.1f}" if key in by_run[n] else "-" for n in names))
    for label, field in (("wall", "wall_s"), ("CPU", "cpu_s"), ("CPU of worker processes", "workers_cpu_s"),
                         ("peak RSS (MiB)", "peak_rss_mib"), ("peak RSS, all processes (MiB)", "tree_peak_rss_mib")):
        table.add_row("total", "", label, *(f"{runs[n][field]:.0f}" if field in runs[n] else "-" for n in names))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
