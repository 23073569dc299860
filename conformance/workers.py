"""One backend's model runs in a worker process, beside the main process's work.

tinygrad's CPU device runs every kernel on one core, and most of its time in the suite is its own
(single-threaded) kernel generation; the float64 reference, torch and MLX use BLAS on every core.
So `run` (runner.py) hands tinygrad's runs of the whole suite to a worker process, which computes
them in the suite's order while the main process computes the reference, the other backends and
the checks. The worker sends each Run as it is done; the main process takes it when the suite
reaches that backend (runner.cached_run), so the checks are exactly those of an in-process run.

- A process, not a thread: tinygrad's compile workers and cache database are not thread-safe
  beside the other frameworks' imports. Spawned, not forked: a fork would copy the main process's
  framework state (MLX, torch threads) into the child.
- Memory stays bounded: the worker sends one Run at a time through a pipe and blocks until the
  main process has read it, so it is at most one run ahead (gpt2's gradients are ~500 MB a run).
- A run that raises is that backend's error outcome for its (case, dtype), with the same message
  as in-process. A worker that dies (killed, out of memory) is the error of the run it was on, and
  a fresh worker takes over the rest; a dead worker is noticed by the closed pipe, never waited on.
- Ctrl-C reaches the worker too (one process group); the main process ends it on the way out.

GPTSPEC_CONFORMANCE_WORKERS=0 runs everything in the main process, as before; =n (default 1) splits
a backend's runs by dtype among up to n workers. The runs of one dtype share their kernels (the next
seed reuses what the first compiled) and those of another dtype share none, so the split costs no
compile; but every worker holds a model and a run of its own (gpt2: a few GB), so the default is one.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
from dataclasses import dataclass
from typing import Iterable

from ..spec import InputError

ENV = "GPTSPEC_CONFORMANCE_WORKERS"
# The backends whose work is single-threaded on a CPU, so that running them beside the rest gains.
SINGLE_CORE = ("tinygrad",)
POLL_S = 1.0  # how often a wait for the worker checks that it still lives
# Worker processes per offloaded backend. More can finish sooner, but each holds a gpt2 model and run of
# its own: one per dtype (3) took the suite's peak memory, all processes, from 6.5 to 12 GB. Off by default:
# one worker costs ~2.7 GB more and, on a machine whose cores were never idle (load 6-13), gained nothing
# (482 s vs 475 s); it pays where a core would otherwise idle while tinygrad runs single-threaded.
DEFAULT_WORKERS = 0


def worker_count(given: int | None = None) -> int:
    """The most worker processes per offloaded backend: `given`, else $GPTSPEC_CONFORMANCE_WORKERS,
    else DEFAULT_WORKERS; 0 = none (everything in the main process)."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 0:
            raise InputError(f"the number of worker processes must be a whole number >= 0, got {given!r}")
        return given
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_WORKERS
    if not value.isdigit():
        raise InputError(f"${ENV} must be a whole number of worker processes (0: every backend in the main "
                         f"process), got {value!r}")
    return int(value)


def offloaded(backends: Iterable, count: int | None = None) -> list:
    """The backends of `backends` to run in workers: the single-core ones that are the registry's
    own (a substituted or wrapped backend stays in the main process, where the caller built it),
    unless workers are off (`count`, default $GPTSPEC_CONFORMANCE_WORKERS, is 0)."""
    from ..backends import get

    if worker_count(count) == 0:
        return []
    out = []
    for b in backends:
        if b.name in SINGLE_CORE:
            try:
                registered = get(b.name)
            except Exception:  # noqa: BLE001 -- not usable here: it runs (and fails) in the main process
                continue
            if registered is b:
                out.append(b)
    return out


def split(plan: list[tuple], count: int) -> list[list[tuple]]:
    """`plan`'s (case, dtype, device) runs as the plans of up to `count` workers, each dtype's runs in
    one worker, so that its seeds reuse its kernels; the suite's order kept."""
    dtypes = list(dict.fromkeys(dtype for _, dtype, _ in plan))
    n = min(count, len(dtypes))
    if n == 0:
        return []
    worker_of = {dtype: i % n for i, dtype in enumerate(dtypes)}
    return [[item for item in plan if worker_of[item[1]] == i] for i in range(n)]


class WorkerError(RuntimeError):
    """A worker's run failed in a way that left no exception of its own to raise here."""


@dataclass(frozen=True)
class _Failure:
    """A run's exception, as the worker sends it when the exception itself does not pickle."""
    type_name: str
    message: str

    def exception(self) -> Exception:
        # named as the original, so the outcome's "Type: message" reads as an in-process run's
        return type(self.type_name, (WorkerError,), {})(self.message)


def _portable(e: Exception):
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 -- any exception type may refuse to round-trip
        return _Failure(type(e).__name__, str(e))


def _serve(backend_name: str, plan: list[tuple], conn) -> None:
    """The worker: backend_run of each (case, dtype, device) of `plan`, in order, each sent as
    (key, Run, None) or (key, None, exception)."""
    try:
        from ..backends import get
        from .crossmachine import inputs_of
        from .runner import backend_run

        backend = get(backend_name)
        inputs = None
        for case, dtype, device in plan:
            key = (backend_name, case, dtype, device)
            try:
                if inputs is None or inputs[0] != case:
                    inputs = None  # the previous case's weights go before this one's load
                    inputs = (case, inputs_of(case))
                message = (key, backend_run(backend, inputs[1], dtype, device), None)
            except Exception as e:  # noqa: BLE001 -- reported as the run's outcome, as in-process
                message = (key, None, _portable(e))
            conn.send(message)  # blocks until the main process reads it: at most one run ahead
            del message
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        pass  # Ctrl-C, or the main process is gone: nothing is left to report to
    finally:
        conn.close()


class _Worker:
    """One spawned process serving the runs of `plan` (keys (backend, case, dtype, device)) in order."""

    def __init__(self, backend_name: str, plan: list[tuple]):
        context = multiprocessing.get_context("spawn")
        self.keys = [(backend_name, *item) for item in plan]
        self._recv, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve, args=(backend_name, plan, send), daemon=True,
                                       name=f"gptspec-{backend_name}")
        self.process.start()
        send.close()  # the child holds the only write end: its death reads as end of file here

    def receive(self):
        """The next (key, run, error) message, or None once the worker is dead."""
        while not self._recv.poll(POLL_S):
            if not self.process.is_alive():
                if self._recv.poll(0):  # it sent its last message, then ended
                    break
                return None
        try:
            return self._recv.recv()
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._recv.close()


class Offload:
    """The worker runs of one suite: `take(key)` gives a planned run's Run (or raises its error);
    a worker that dies is that run's error and a new one continues with the rest of its plan.
    `plans`: (backend name, [(case, dtype, device), ...]), one per worker process."""

    def __init__(self, plans: Iterable[tuple[str, list[tuple]]]):
        self._workers: list[_Worker | None] = []
        self._worker_of: dict[tuple, int] = {}
        try:
            for name, plan in plans:
                if plan:
                    for item in plan:
                        self._worker_of[(name, *item)] = len(self._workers)
                    self._workers.append(_Worker(name, list(plan)))
        except BaseException:
            self.close()
            raise

    def serves(self, key: tuple) -> bool:
        return key in self._worker_of

    def take(self, key: tuple):
        """The worker's Run of `key`, waiting for it; its exception raised. Runs the suite skipped on
        the way (a case that raised before reaching this backend) are dropped."""
        i = self._worker_of.pop(key)
        while True:
            worker = self._workers[i]
            message = worker.receive()
            if message is None:
                return self._died(i, key)
            got, run, error = message
            if got == key:
                if error is not None:
                    raise error.exception() if isinstance(error, _Failure) else error
                return run
            if got not in worker.keys or worker.keys.index(got) > worker.keys.index(key):
                raise WorkerError(f"the {key[0]} worker sent the run of {got} while {key} was expected")

    def _died(self, i: int, key: tuple):
        worker = self._workers[i]
        worker.process.join(timeout=10)  # its pipe closes a moment before it can be reaped
        code = worker.process.exitcode
        worker.close()
        rest = worker.keys[worker.keys.index(key) + 1:]
        self._workers[i] = _Worker(key[0], [k[1:] for k in rest]) if rest else None
        raise WorkerError(f"the {key[0]} worker process died (exit code {code}) during this run; "
                          f"a new worker continues with the {len(rest)} runs after it")

    def close(self) -> None:
        for worker in self._workers:
            if worker is not None:
                worker.close()
        self._workers.clear()
        self._worker_of.clear()

    def __enter__(self) -> "Offload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The suite's offload while `run` is under way (runner.cached_run takes from it); None otherwise.
current: Offload | None = None
