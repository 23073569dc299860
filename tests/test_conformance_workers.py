"""tinygrad's conformance runs in worker processes (conformance/workers.py): the same Runs bit for bit as
in the main process, a run's exception or a worker's death is that run's error outcome, nothing hangs,
and Ctrl-C leaves no worker behind."""
from __future__ import annotations

import multiprocessing
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from gptspec import backends
from gptspec.conformance import Case, runner, workers
from gptspec.spec import BackendError, InputError

pytestmark = pytest.mark.skipif("tinygrad" not in backends.available(),
                                reason="the workers run tinygrad, which is not usable here")

TINY = Case("test-tiny", 0, batch=3, length=16)


def in_worker() -> bool:
    return multiprocessing.parent_process() is not None


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickle rebuilds an exception from its args alone: this one cannot be
        super().__init__(f"{a} and {b}")


# Cases whose weights fail to load in a worker process only, so that the main process's reference runs.
@dataclass(frozen=True)
class FailsInWorker(Case):
    def checkpoint(self):
        if in_worker():
            raise BackendError("the weights fail in the worker")
        return super().checkpoint()


@dataclass(frozen=True)
class UnpicklableInWorker(Case):
    def checkpoint(self):
        if in_worker():
            raise Unpicklable("one", "two")
        return super().checkpoint()


@dataclass(frozen=True)
class KilledInWorker(Case):
    def checkpoint(self):
        if in_worker():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().checkpoint()


class Hung(BaseException):
    """Not an Exception: run_case would report one as the backend's error outcome and go on."""


@contextmanager
def deadline(seconds: int):
    """A hang becomes a failure."""
    def expired(*_):
        raise Hung(f"still waiting after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def our_workers() -> list:
    """The suite's worker processes still alive (tinygrad's own compile pool aside)."""
    return [p for p in multiprocessing.active_children() if p.name.startswith("gptspec-")]


def tinygrad_rows(outcomes):
    return [o for o in outcomes if o.subject == "tinygrad"]


def test_worker_runs_equal_in_process_runs_bit_for_bit(monkeypatch):
    taken, computed = [], []
    take, backend_run = workers.Offload.take, runner.backend_run
    monkeypatch.setattr(workers.Offload, "take", lambda self, key: taken.append(take(self, key)) or taken[-1])
    monkeypatch.setattr(runner, "backend_run", lambda *a: computed.append(backend_run(*a)) or computed[-1])
    with deadline(600):
        offloaded = runner.run(["tinygrad"], [TINY], ["float32"], worker_processes=1)
        here = runner.run(["tinygrad"], [TINY], ["float32"], worker_processes=0)
    assert len(taken) == 1 and len(computed) == 1  # one from the worker, one computed here
    (a,), (b,) = taken, computed
    assert set(a.grads) == set(b.grads) and set(a.stats) == set(b.stats)
    for x, y in [(a.logits, b.logits), (np.float64(a.loss), np.float64(b.loss))] + \
            [(a.grads[n], b.grads[n]) for n in b.grads] + [(a.stats[n], b.stats[n]) for n in b.stats]:
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    (x,), (y,) = tinygrad_rows(offloaded), tinygrad_rows(here)
    assert x.status == y.status == "ran" and x.ok
    assert [(c.tensor, c.rel_l2, c.rel_max) for c in x.checks] == [(c.tensor, c.rel_l2, c.rel_max) for c in y.checks]


def test_an_exception_in_the_worker_is_that_runs_error_outcome():
    cases = [FailsInWorker("test-tiny", 0, batch=3, length=16), UnpicklableInWorker("test-tiny", 1, batch=3, length=16)]
    with deadline(300):
        outcomes = runner.run(["tinygrad"], cases, ["float32"], worker_processes=1)
    first, second = tinygrad_rows(outcomes)
    # as run_case reports an exception raised in the main process: "Type: message"
    assert (first.status, first.message) == ("error", "BackendError: the weights fail in the worker")
    assert (second.status, second.message) == ("error", "Unpicklable: one and two")
    assert our_workers() == []


def test_a_killed_worker_is_its_runs_error_and_a_new_worker_runs_the_rest():
    cases = [KilledInWorker("test-tiny", 0, batch=3, length=16), Case("test-tiny", 1, batch=3, length=16)]
    with deadline(600):
        outcomes = runner.run(["tinygrad"], cases, ["float32"], worker_processes=1)
    killed, after = tinygrad_rows(outcomes)
    assert killed.status == "error" and "worker process died (exit code -9)" in killed.message
    assert after.status == "ran" and after.ok and after.checks
    assert our_workers() == []


def test_ctrl_c_ends_the_workers():
    def interrupt(case_id, subject, dtype):
        raise KeyboardInterrupt

    with deadline(120), pytest.raises(KeyboardInterrupt):
        runner.run(["tinygrad"], [TINY], ["float32"], worker_processes=1, on_start=interrupt)
    assert our_workers() == [] and workers.current is None


def test_the_worker_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(workers.ENV, "0")
    assert workers.worker_count() == 0 and workers.offloaded([backends.get("tinygrad")]) == []
    monkeypatch.setenv(workers.ENV, "2")
    assert workers.worker_count() == 2 and workers.offloaded([backends.get("tinygrad")]) == [backends.get("tinygrad")]
    monkeypatch.delenv(workers.ENV)
    assert workers.worker_count() == workers.DEFAULT_WORKERS == 1  # measured faster on an idle 2-core machine
    monkeypatch.setenv(workers.ENV, "two")
    with pytest.raises(InputError, match=r"GPTSPEC_CONFORMANCE_WORKERS must be a whole number.*'two'"):
        workers.worker_count()


def test_runs_are_split_by_dtype_in_the_suites_order():
    plan = [(c, d, "CPU") for c in ("a", "b") for d in ("float32", "bfloat16", "float16")]
    assert workers.split(plan, 3) == [[p for p in plan if p[1] == d] for d in ("float32", "bfloat16", "float16")]
    assert workers.split(plan, 5) == workers.split(plan, 3)
    assert workers.split(plan, 1) == [plan]
    assert workers.split(plan, 2) == [[p for p in plan if p[1] != "bfloat16"], [p for p in plan if p[1] == "bfloat16"]]
    assert workers.split([], 2) == []


def test_generation_and_training_runs_in_the_worker_equal_in_process_ones(monkeypatch):
    """The worker also serves tinygrad's KV-cache generation and training runs (the suite's order: model,
    generation, then the trajectories), and their checks are those of an in-process run, number for number."""
    from gptspec.conformance.trajectory import trajectory_cases

    tcase = next(c for c in trajectory_cases() if c.id.startswith("test-tiny/"))
    served = []
    take = workers.Offload.take
    monkeypatch.setattr(workers.Offload, "take", lambda self, key: served.append(key[-1]) or take(self, key))
    suite = dict(generation=[TINY], training=[(tcase, "float32")])
    with deadline(900):
        offloaded = runner.run(["tinygrad"], [TINY], ["float32"], worker_processes=1, **suite)
        here = runner.run(["tinygrad"], [TINY], ["float32"], worker_processes=0, **suite)
    assert served == ["model", "generation", "trajectory"]
    assert [o.kind for o in tinygrad_rows(offloaded)] == ["model", "generation", "trajectory"]

    def numbers(outcomes):
        return [(o.kind, o.status, [(c.tensor, c.rel_l2, c.rel_max) for c in o.checks],
                 [v.message for v in o.verdicts]) for o in tinygrad_rows(outcomes)]

    assert numbers(offloaded) == numbers(here)
    assert all(o.ok and o.checks for o in tinygrad_rows(offloaded))
    assert our_workers() == []


def test_training_runs_that_need_the_reference_stay_in_the_main_process():
    """The early-exit loss's draws come from the reference's weights at each step: such a run is not planned
    for a worker (which never computes the float64 reference), nor is a gpt2-sized one (its memory would add to
    the reference's training run); the other trajectories are, after the model runs."""
    from gptspec.conformance.trajectory import trajectory_cases

    tiny, exits, gpt2 = (next(c for c in trajectory_cases() if c.id.startswith(p))
                         for p in ("test-tiny/", "early-exit:", "gpt2/"))
    tg = backends.get("tinygrad")
    dev = tg.devices()[0]
    plan = runner._plan(tg, [TINY], ["float32"], None, {TINY}, [(exits, "float32"), (tiny, "float32"),
                                                                 (tiny, "float16"), (gpt2, "float32")])
    assert plan == [(TINY, "float32", dev, "model"), (TINY, "float32", dev, "generation"),
                    (tiny, "float32", dev, "trajectory")]  # float16: not one of test-tiny's training precisions
    assert gpt2.spec.n_params > runner.WORKER_TRAINING_PARAMS
    # the gpt2-sized one is the main process's, done ahead while it waits for the worker
    training = [(exits, "float32"), (tiny, "float32"), (gpt2, "float32")]
    assert runner._training_plan(tg, training, None, ahead=True) == [(gpt2, "float32", dev, "trajectory")]


def test_the_main_process_does_its_chores_while_it_waits():
    """Offload's chores run, in order, while the run asked for is not done: a keyed one's run (or error) is
    what take gives for its key; one asked for before it was done is dropped; an unkeyed one's error is ignored."""
    done = []

    def fails():
        raise ValueError("the chore failed")

    kept, failing, late = ("tinygrad", "kept"), ("tinygrad", "failing"), ("tinygrad", "late")
    chores = [(None, lambda: done.append("first")), (None, fails), (kept, lambda: "the kept run"),
              (failing, fails), (late, lambda: done.append("late"))]
    key = ("tinygrad", TINY, "float32", backends.get("tinygrad").devices()[0], "model")
    with deadline(300), workers.Offload([(key[0], [key[1:]])], chores) as offload:
        assert offload.processes == 1
        offload.forget(late)  # asked for before its chore was done: computed there, never here
        run = offload.take(key)  # the worker spawns, imports tinygrad and compiles: seconds, every chore done
        assert done == ["first"] and run.grads
        assert offload.serves(kept) and offload.take(kept) == "the kept run" and not offload.serves(kept)
        with pytest.raises(ValueError, match="the chore failed"):
            offload.take(failing)
    # waiting for a run whose case is not small, the main process holds that case too: only small chores then
    with deadline(300), workers.Offload([(key[0], [key[1:]])], [(None, lambda: done.append("no")),
                                                               (None, lambda: done.append("small"), True)],
                                        lambda key: False) as offload:
        offload.take(key)
    assert done == ["first", "small"]
    assert our_workers() == []


def test_a_suite_with_a_large_case_leaves_the_workers_small_training_runs_to_the_main_process(monkeypatch):
    """The worker is the longer process when gpt2's runs are its own: its small training runs become chores the
    main process may do while it waits for the worker's large runs, and so do the gpt2 training runs of the float64
    reference and then of the other backends, where the machine has the memory. Without a large case, the small
    ones stay with the worker."""
    from gptspec.conformance.trajectory import trajectory_cases

    tiny, gpt2 = (next(c for c in trajectory_cases() if c.id.startswith(p)) for p in ("test-tiny/", "gpt2/"))
    big = Case("gpt2", 0, batch=1, length=64)
    made = {}

    class Recorded(workers.Offload):
        def __init__(self, plans, chores, chores_while):
            made.update(plans=list(plans), chores=list(chores), chores_while=chores_while)
            raise KeyboardInterrupt  # planned: enough

    monkeypatch.setattr(workers, "Offload", Recorded)
    training = [(tiny, "float32"), (gpt2, "float32")]
    others = [b for b in ("torch", "mlx") if b in backends.available()]  # trained in the main process
    with pytest.raises(KeyboardInterrupt):
        runner.run(["tinygrad", *others], [TINY, big], ["float32"], worker_processes=1, training=training)
    dev = backends.get("tinygrad").devices()[0]
    (name, plan), = made["plans"]
    assert [item[0] for item in plan] == [TINY, big]  # the model runs only
    keyed = [(c[0], len(c) > 2 and c[2]) for c in made["chores"] if c[0] is not None]
    assert keyed == [(("tinygrad", gpt2, "float32", dev, "trajectory"), False),  # too large to run beside gpt2's
                     (("tinygrad", tiny, "float32", dev, "trajectory"), True),
                     (("reference", gpt2, "float32"), True),  # then the others' gpt2 runs, from its inputs
                     *(((b, gpt2, "float32", backends.get(b).devices()[0], "trajectory"), True) for b in others)]
    assert made["chores_while"](("tinygrad", TINY)) and not made["chores_while"](("tinygrad", big))
    # a precision the case does not run in trains nothing: no large run is planned for it
    assert "mixed_bfloat16" not in gpt2.precisions
    with pytest.raises(KeyboardInterrupt):
        runner.run(["tinygrad", *others], [TINY, big], ["float32"], worker_processes=1,
                   training=[(gpt2, "mixed_bfloat16")])
    assert [c for c in made["chores"] if c[0] is not None] == []
    # on a machine with less memory the large training runs wait for their turn in the suite
    monkeypatch.setattr(runner, "_memory_bytes", lambda: runner.BESIDE_TRAINING_MEMORY - 1)
    with pytest.raises(KeyboardInterrupt):
        runner.run(["tinygrad", *others], [TINY, big], ["float32"], worker_processes=1, training=training)
    assert [c[0] for c in made["chores"] if c[0] is not None] == [keyed[0][0], keyed[1][0]]
    with pytest.raises(KeyboardInterrupt):
        runner.run(["tinygrad"], [TINY], ["float32"], worker_processes=1, training=training[:1])
    (name, plan), = made["plans"]
    assert plan[-1] == (tiny, "float32", dev, "trajectory")
    assert all(c[0] is None for c in made["chores"])


def test_a_worker_run_computes_on_one_core(monkeypatch):
    """workers.compute (the worker's runs, and the main process's chores of them) runs inside Backend.threads(1);
    tinygrad's turns its parallel kernel generation off there (a chore's pool took the worker's core)."""
    from tinygrad.helpers import PARALLEL

    tg = backends.get("tinygrad")
    seen = []
    monkeypatch.setattr(workers, "_compute", lambda *args: seen.append(PARALLEL.value))
    before = PARALLEL.value
    workers.compute(tg, TINY, "float32", "CPU", "model", {})
    assert seen == [0] and PARALLEL.value == before


def test_the_main_process_leaves_the_workers_their_cores(monkeypatch):
    """While worker processes run, the main process's BLAS libraries and backends keep to the cores the workers
    leave (at least one), and get their own back after; without workers nothing changes. run() enters it with
    the number of worker processes its plans started."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import torch

    def blas_threads():
        return {d["filepath"]: d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"}

    cores = len(os.sched_getaffinity(0))
    left = max(1, cores - 1)
    before, torch_before = blas_threads(), torch.get_num_threads()
    assert before, "numpy's BLAS is not seen"
    with workers.sharing_cores(0, [backends.get("torch")]):
        assert blas_threads() == before and torch.get_num_threads() == torch_before
    with workers.sharing_cores(1, [backends.get("torch")]):
        assert all(n <= left for n in blas_threads().values())  # 2 cores: numpy's OpenBLAS, 2 threads -> 1
        assert torch.get_num_threads() == min(left, torch_before)
    assert blas_threads() == before and torch.get_num_threads() == torch_before

    seen = []

    class Recorded(workers.Offload):
        processes = 1

        def __init__(self, plans, chores, chores_while):
            super().__init__([], chores, chores_while)

    @contextmanager
    def sharing(busy, resolved):
        seen.append((busy, [b.name for b in resolved]))
        raise KeyboardInterrupt  # entered: enough
        yield

    monkeypatch.setattr(workers, "Offload", Recorded)
    monkeypatch.setattr(workers, "sharing_cores", sharing)
    with pytest.raises(KeyboardInterrupt):
        runner.run(["tinygrad", "torch"], [TINY], ["float32"], worker_processes=1)
    assert seen == [(1, ["tinygrad", "torch"])]


def test_the_worker_queues_small_runs_and_waits_behind_a_large_one(monkeypatch):
    """The worker's outbox holds finished runs up to AHEAD_BYTES of arrays (always one), so the worker goes on
    through small cases while the main process is busy, and never holds two gpt2-sized runs."""
    import threading

    monkeypatch.setattr(workers, "AHEAD_BYTES", 1000)

    class Conn:  # a main process that reads nothing until released
        def __init__(self):
            self.sent, self.release = [], threading.Event()

        def send(self, message):
            self.release.wait()
            self.sent.append(message)

    conn = Conn()
    box = workers._Outbox(conn)
    small = [(("k", i), {"grads": {"w": np.zeros(10)}}, None) for i in range(6)]  # 80 bytes each
    with deadline(10):
        for message in small:
            box.put(message)  # one handed over, five queued: 400 bytes, no wait
    large = (("k", "large"), {"grads": {"w": np.zeros(200)}}, None)  # 1600 bytes: waits for an empty queue
    assert workers.array_bytes(large) == 1600 and workers.array_bytes(small[0]) == 80
    putting = threading.Thread(target=box.put, args=(large,))
    putting.start()
    putting.join(0.5)
    assert putting.is_alive()  # held back behind the queued runs
    conn.release.set()
    putting.join(10)
    box.close()
    assert [m[0] for m in conn.sent] == [m[0] for m in small] + [("k", "large")]
