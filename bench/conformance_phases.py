"""Where `gptspec conformance` spends its time: per backend, case size and phase, one run per tree.

    python -m bench.conformance_phases [--against /path/to/other/checkout] [--json out.json] [-- conformance options]

Runs the command in-process (its own options after `--`, e.g. `-- --only test-mini`; `{run}` in them
becomes "this" or "other", e.g. `-- --json /tmp/{run}.json` to compare the two runs' checks), with a timer
around each backend method the runner calls (build, forward, loss_and_grads, residual_stats,
normalize, state, extend, train_step) and around the float64 reference, the comparisons, and the
generation and training rows; then prints seconds per (subject, case size, phase), the wall time,
the process's CPU time (user + system) and its peak resident memory. Timed phases nest (a
generation row calls extend), so the table lists each on its own rather than summing them.
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

    start, cpu0 = time.perf_counter(), time.process_time()
    code = cli.main(["conformance", *argv])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"exit": code, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak_kib / 1024,
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
    for label, field in (("wall", "wall_s"), ("CPU", "cpu_s"), ("peak RSS (MiB)", "peak_rss_mib")):
        table.add_row("total", "", label, *(f"{runs[n][field]:.0f}" for n in names))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
