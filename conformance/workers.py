"""One backend's runs in a worker process, beside the main process's work.

tinygrad's CPU device runs every kernel on one core, and most of its time in the suite is its own
(single-threaded) kernel generation; the float64 reference, torch and MLX use BLAS on every core.
So `run` (runner.py) hands tinygrad's runs of the whole suite to a worker process: its model runs
(runner.backend_run), its KV-cache generation runs (generation.generation_run) and its training
runs (trajectory.backend_trajectory), which it computes in the suite's order from the cases'
weights and inputs alone while the main process computes the float64 reference, the other backends
and the checks. The worker sends each run as it is done; the main process takes it when the suite
reaches that backend (runner.cached_run, generation.run_generation, trajectory.cached_trajectory,
through take_or_compute), so the checks are exactly those of an in-process run.

- A process, not a thread: tinygrad's compile workers and cache database are not thread-safe
  beside the other frameworks' imports. Spawned, not forked: a fork would copy the main process's
  framework state (MLX, torch threads) into the child.
- Memory stays bounded: beside the run it computes, the worker holds at most the one its sending
  thread is handing over and AHEAD_BYTES (600 MB) of finished runs in its queue, or one run if that
  one is larger (a gpt2 run's gradients are ~500 MB, a small case's a few KB).
- While the main process waits for a run, it does its chores (Offload): work it needs later anyway,
  such as the condition estimates of the cases to come, the offloaded backend's training runs too
  large for a worker, and, in a suite with a large case, the worker's small training runs and the
  large ones of the reference and the other backends (runner.run), so that a wait is not idle and
  the worker finishes sooner.
- While workers run, the main process keeps its threads to the cores they leave (sharing_cores).
- A run that raises is that backend's error outcome for its (case, dtype), with the same message
  as in-process. A worker that dies (killed, out of memory) is the error of the run it was on, and
  a fresh worker takes over the rest; a dead worker is noticed by the closed pipe, never waited on.
- A training run whose inputs need the float64 reference (the early-exit loss's draws) or whose memory
  would add to the reference's training run (gpt2-sized) stays in the main process (runner._plan).
- Ctrl-C reaches the worker too (one process group); the main process ends it on the way out.

GPTSPEC_CONFORMANCE_WORKERS=0 runs everything in the main process; =n (default 1) splits a
backend's runs by dtype (training runs: by precision) among up to n workers. The runs of one dtype
share their kernels (the next seed reuses what the first compiled) and those of another dtype share
none, so the split costs no compile; but every worker holds a model and runs of its own (gpt2: a
few GB), so the default is one.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..spec import InputError

ENV = "GPTSPEC_CONFORMANCE_WORKERS"
# The backends whose work is single-threaded on a CPU, so that running them beside the rest gains.
SINGLE_CORE = ("tinygrad",)
POLL_S = 1.0  # how often a wait for the worker checks that it still lives
# The bytes of finished runs waiting in a worker's queue (always at least one run), beside the one its sending
# thread is handing over and the one it computes. Sending from the computing thread (send, then wait for the
# read) left the worker idle whenever the main process was busy: it began each gpt2 run only once the last had
# been taken. Bytes, not runs: a gpt2 run's gradients are ~0.5 GB, a small case's a few KB, and while the main
# process does its chores (Offload) the worker should go on through the small cases.
AHEAD_BYTES = 600 << 20
# Worker processes per offloaded backend. More can finish sooner, but each holds a gpt2 model and runs of
# its own: one per dtype (3) took the suite's peak memory, all processes, from 6.5 to 12 GB. One by default:
# on an idle 2-core machine it took `gptspec conformance` from 314 s to 271 s (bench/conformance_phases.py)
# at a lower peak (13.8 GB, all processes, against 14.4); on a machine whose cores were never idle (load
# 6-13) it gained nothing (482 s vs 475 s), since it needs the core the main process leaves.
DEFAULT_WORKERS = 1


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
    """`plan`'s (case, dtype, device, kind) runs as the plans of up to `count` workers, each dtype's (or
    training precision's) runs in one worker, so that its seeds reuse its kernels; the suite's order kept."""
    dtypes = list(dict.fromkeys(item[1] for item in plan))
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


def compute(backend, case, dtype: str, device: str, kind: str, inputs: dict):
    """One planned run, as the main process would compute it: a model run (runner.backend_run), a
    generation run (generation.generation_run) or a training run (trajectory.backend_trajectory), from the
    case's weights and inputs alone, never the float64 reference. `inputs` keeps the current case's.
    On one core (Backend.threads): a worker's runs, in the worker or as a chore of the main process, run
    beside another process (a chore's parallel compile took the core of the worker it was waiting for)."""
    with backend.threads(1):
        return _compute(backend, case, dtype, device, kind, inputs)


def _compute(backend, case, dtype: str, device: str, kind: str, inputs: dict):
    from .crossmachine import inputs_of, trajectory_inputs

    if inputs.get("case") != case:
        inputs.clear()  # the previous case's weights go before this one's load
        inputs["case"] = case
    if kind == "trajectory":
        from .trajectory import backend_trajectory

        if dtype not in inputs:
            inputs[dtype] = trajectory_inputs(case, dtype)  # dtype: the training precision
        return backend_trajectory(backend, case, inputs[dtype], device)
    if "model" not in inputs:
        inputs["model"] = inputs_of(case)
    if kind == "generation":
        from .generation import generation_run

        return generation_run(backend, case, dtype, device, inputs["model"])
    from .runner import backend_run

    return backend_run(backend, inputs["model"], dtype, device)


@contextlib.contextmanager
def sharing_cores(busy: int, backends: Iterable = ()):
    """This process's threads while `busy` worker processes each keep a core busy: the cores left (at least one),
    for the backends' own threads (Backend.threads) and for every BLAS library loaded (threadpoolctl, installed
    with the tinygrad extra, whose runs are the ones the workers compute). Two threads on the one core a worker
    leaves on a 2-core machine wait on each other at every parallel region (OpenBLAS, torch's OpenMP), and
    they take the worker's core too: `gptspec conformance` took 167 s with 2, 149 s with 1 (docs/tinygrad.md 4)."""
    if not busy:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, cores - busy)
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # the core's own dependencies do not include it: then BLAS keeps its threads
            pass
        else:
            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        for backend in backends:
            stack.enter_context(backend.threads(n))
        yield


class _Outbox:
    """The worker's messages, sent by a thread of their own: while the main process has not yet read a run,
    the worker computes the next ones, at most AHEAD_BYTES of them finished and waiting. A send that fails (the
    main process is gone) ends the worker at its next put."""

    def __init__(self, conn):
        self.conn, self.gone = conn, threading.Event()
        self.queue: collections.deque = collections.deque()  # (message, bytes)
        self.queued_bytes, self.changed = 0, threading.Condition()
        self.thread = threading.Thread(target=self._send_all, daemon=True, name="gptspec-outbox")
        self.thread.start()

    def _send_all(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.queue)
                message, size = self.queue.popleft()
                self.queued_bytes -= size
                self.changed.notify_all()
            if message is None:
                return
            try:
                self.conn.send(message)  # returns once the main process has read it (large runs)
            except (BrokenPipeError, EOFError, OSError):
                self.gone.set()
                return
            del message

    def put(self, message) -> None:
        size = array_bytes(message)
        with self.changed:
            while self.gone.is_set() or (self.queue and self.queued_bytes + size > AHEAD_BYTES):
                if self.gone.is_set():
                    raise BrokenPipeError("the main process is gone")
                self.changed.wait(POLL_S)
            self.queue.append((message, size))
            self.queued_bytes += size
            self.changed.notify_all()

    def close(self) -> None:
        """Every message sent (or the main process gone)."""
        self.put(None)
        self.thread.join()


def array_bytes(obj) -> int:
    """The bytes of the numpy arrays in a message (a Run, a generation or training run: dataclasses, dicts,
    lists and tuples of them), which is what a finished run holds."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return sum(array_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(array_bytes(v) for v in obj)
    return 0


def _serve(backend_name: str, plan: list[tuple], conn) -> None:
    """The worker: each (case, dtype, device, kind) of `plan` computed in order (compute), each sent as
    (key, run, None) or (key, None, exception)."""
    try:
        from ..backends import get

        backend = get(backend_name)
        inputs: dict = {}
        outbox = _Outbox(conn)
        for item in plan:
            key = (backend_name, *item)
            try:
                message = (key, compute(backend, *item, inputs), None)
            except Exception as e:  # noqa: BLE001 -- reported as the run's outcome, as in-process
                message = (key, None, _portable(e))
            outbox.put(message)  # waits while AHEAD_BYTES of finished runs are unread
            del message
        outbox.close()
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        pass  # Ctrl-C, or the main process is gone: nothing is left to report to
    finally:
        conn.close()


class _Worker:
    """One spawned process serving the runs of `plan` (keys (backend, case, dtype, device, kind)) in order."""

    def __init__(self, backend_name: str, plan: list[tuple]):
        context = multiprocessing.get_context("spawn")
        self.keys = [(backend_name, *item) for item in plan]
        self._recv, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve, args=(backend_name, plan, send), daemon=True,
                                       name=f"gptspec-{backend_name}")
        self.process.start()
        send.close()  # the child holds the only write end: its death reads as end of file here

    def ready(self) -> bool:
        """Whether a message (or the end of the pipe) can be read without waiting."""
        return self._recv.poll(0)

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
    `plans`: (backend name, [(case, dtype, device, kind), ...]), one per worker process.
    `chores`: (key, callable) or (key, callable, beside) tuples of work the main process will need later and
    can do at any time; `take` does them, in order, while the run it waits for is not yet done, so that the
    wait is not idle. With a key, a chore computes that run here (the one `take(key)` then returns, or raises
    what the chore raised); a chore not yet done when its run is asked for is dropped (take_or_compute
    computes it then). A chore without a key fills a cache of its own; what it raises is ignored (the later
    use raises it again). `chores_while(key)`: whether every chore may run while waiting for `key`'s run;
    where not (the runner: while the main process holds a large case), only those marked `beside` do."""

    def __init__(self, plans: Iterable[tuple[str, list[tuple]]],
                 chores: Iterable[tuple[tuple | None, Callable[[], object]]] = (),
                 chores_while: Callable[[tuple], bool] = lambda key: True):
        self._workers: list[_Worker | None] = []
        self._worker_of: dict[tuple, int] = {}
        self._chores, self._chores_while = collections.deque(chores), chores_while
        self._kept: dict[tuple, tuple] = {}  # key -> (run, exception) of the chores done
        try:
            for name, plan in plans:
                if plan:
                    for item in plan:
                        self._worker_of[(name, *item)] = len(self._workers)
                    self._workers.append(_Worker(name, list(plan)))
        except BaseException:
            self.close()
            raise

    @property
    def processes(self) -> int:
        """The worker processes computing the plans (each keeps a core busy)."""
        return sum(w is not None for w in self._workers)

    def serves(self, key: tuple) -> bool:
        return key in self._worker_of or key in self._kept

    def forget(self, key: tuple) -> None:
        """`key`'s chore, if not yet done: its run is being computed now, where it is needed."""
        self._chores = collections.deque(c for c in self._chores if c[0] != key)

    def take(self, key: tuple):
        """The worker's Run of `key` (or the one a chore computed), waiting for it; its exception raised.
        Runs the suite skipped on the way (a case that raised before reaching this backend) are dropped."""
        if key in self._kept:
            run, error = self._kept.pop(key)
            if error is not None:
                raise error
            return run
        i = self._worker_of.pop(key)
        every = self._chores_while(key)
        while True:
            worker = self._workers[i]
            chore = next((c for c in self._chores if every or _beside(c)), None)
            if chore is not None and not worker.ready():
                self._chore(chore)
                continue
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

    def _chore(self, chore: tuple) -> None:
        self._chores.remove(chore)
        key, work = chore[:2]
        try:
            done = (work(), None)
        except Exception as e:  # noqa: BLE001 -- a keyed run's error is its outcome, as in-process
            done = (None, e)
        if key is not None:
            self._kept[key] = done

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
        self._chores.clear()
        self._kept.clear()

    def __enter__(self) -> "Offload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _beside(chore: tuple) -> bool:
    """Whether a chore may run while the main process holds a large case (its third field)."""
    return len(chore) > 2 and bool(chore[2])


# The suite's offload while `run` is under way (runner.cached_run takes from it); None otherwise.
current: Offload | None = None


def take_or_compute(key: tuple, compute_here):
    """The run of `key` (backend, case, dtype, device, kind) from the suite's worker where it computes it
    (or from a chore done while waiting), else `compute_here()`."""
    if current is not None:
        if current.serves(key):
            return current.take(key)
        current.forget(key)
    return compute_here()
