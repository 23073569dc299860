"""The training loop of `gptspec train`, written once over the Backend API (build, optimizer,
train_step, optimizer_state, forward), so every backend runs the same loop and the step is exactly
Backend.train's (SPEC.md 22).

Each iteration `it` takes its grad_accum micro-batches from ds.batch("train", B, T, seed, step=it,
micro=k), a pure function of the run's seed and the step, so the data position is the step itself;
runs one Backend.train_step; appends the step's metrics; evaluates every eval_interval steps and
checkpoints every ckpt_interval steps, and both at the end.

Data parallel (SPEC.md 25, runs/distributed.py): under torchrun or mlx.launch, or with devices > 1 in
tinygrad, each rank takes its share r*A .. r*A + A - 1 of the global micro-batches and runs the step with
grad_accum A; the engine averages the gradients; rank 0 alone writes, evaluates and checkpoints.

Ctrl-C: the first one asks the loop to stop after the step in progress (which completes), write a
final checkpoint and return "interrupted"; a second one, or a KeyboardInterrupt raised inside a step,
stops at once, and then the model may hold half a step: nothing is written from it, and the last
complete checkpoint stays the run's state. TrainingDiverged stops the run with the step and tensor;
no checkpoint follows it.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import SPEC_VERSION, InputError, ModelSpec
from ..spec.train import TrainingDiverged
from . import checkpoint, distributed, metrics
from .config import OPERATIONAL, RunConfig, with_overrides
from .evaluate import sample_seed, sample_text, val_loss
from .throughput import device_description, flops_per_token, mfu, peak


@dataclass
class RunResult:
    run_dir: Path
    status: str                       # "done", "interrupted" or "diverged"
    step: int                         # optimizer steps done (the last complete one)
    losses: list[float] = field(default_factory=list)   # this session's step losses
    val_loss: float | None = None     # the last evaluation's
    checkpoint: Path | None = None    # the last complete checkpoint, None if there is none
    checkpoint_step: int | None = None
    message: str = ""


class Observer:
    """What the loop reports to a display (cli/train.py); this one shows nothing."""

    def begin(self, info: dict[str, Any]) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def evaluation(self, record: dict[str, Any]) -> None: ...
    def note(self, text: str) -> None: ...
    def end(self, result: RunResult) -> None: ...


# -- the run directory ------------------------------------------------------------------------------------
def _holds_run(run_dir: Path) -> bool:
    return (run_dir / metrics.FILE).exists() or any(run_dir.glob(f"{checkpoint.NAME}*"))


def _clear(run_dir: Path) -> None:
    """--force: remove what a run writes (and nothing else a user may keep there)."""
    for p in run_dir.glob(f"{checkpoint.NAME}*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in (metrics.FILE, "loss.png"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


def _open_data(path: str):
    from ..data import TokenShards

    return TokenShards.open(path)


# -- starting and resuming -------------------------------------------------------------------------------
def train_run(config: RunConfig, run_dir, *, force: bool = False, observer: Observer | None = None) -> RunResult:
    """A new run of `config` in `run_dir`; an existing run there is refused unless `force`."""
    from .model import starting_model

    run_dir = Path(run_dir)
    world = distributed.detect(config.device, config.devices)
    distributed.configure(world, config.backend, config.devices, config.fsdp)
    world.per_rank_accum(config.train_spec.grad_accum)
    if world.is_main and run_dir.exists() and _holds_run(run_dir):
        if not force:
            raise InputError(f"{run_dir} already holds a run ({checkpoint.describe(run_dir)}): --resume it to "
                             "continue, or --force to delete its checkpoint and metrics and start over")
        _clear(run_dir)
    config = config.replace(data=str(Path(config.data).resolve()))
    ds = _open_data(config.data)
    start = starting_model(config.model, config.variant, config.sizes, config.seed, ds.vocab_size)
    ds.check_usable(start.spec, config.batch_size, config.block_size)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return _Session(config, run_dir, ds, start.spec, start.params, None, origin=start.origin,
                    observer=observer, world=world).run()


def resume_run(run_dir, changes: dict[str, Any] | None = None, *, train_overrides: dict[str, Any] | None = None,
               sizes: dict[str, int] | None = None, observer: Observer | None = None) -> RunResult:
    """Continue the run in `run_dir` from its last complete checkpoint. `changes` may set the operational
    fields (runs/config.py OPERATIONAL: backend, steps, intervals, ...), `data` (the same shards moved
    elsewhere: their fingerprint must match) and `model` (must name the run's own); any TrainSpec field in
    `train_overrides` or size in `sizes` must equal the run's own (they are checked, not applied)."""
    run_dir = Path(run_dir)
    if not (run_dir / metrics.FILE).exists() and not any(run_dir.glob(f"{checkpoint.NAME}*")):
        raise InputError(f"--resume {run_dir}: not a gptspec run directory (no {checkpoint.NAME}/, no {metrics.FILE})")
    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    world = distributed.detect(changes.get("device"), changes.get("devices", 1))
    obs = (observer or Observer()) if world.is_main else Observer()
    if world.is_main:  # rank 0 alone writes: it completes or drops a half-written checkpoint first
        for line in checkpoint.recover(run_dir):
            obs.note(line)
    world.barrier()
    saved = checkpoint.read(run_dir)
    progress = saved.progress
    stored = RunConfig.from_dict(progress["config"])
    problems = []
    if progress.get("spec_version") != SPEC_VERSION:
        problems.append(f"spec version: the run was made under SPEC_VERSION {progress.get('spec_version')!r}, "
                        f"this gptspec is {SPEC_VERSION!r}")
    if "model" in changes and changes["model"] != stored.model:
        problems.append(f"model: the run trains {stored.model!r}, --model says {changes['model']!r}")
    wanted = {k: v for k, v in changes.items() if k not in ("model", "data")}
    try:
        config = stored.replace(**wanted)
    except TypeError as e:
        raise InputError(f"--resume: {e}") from None
    if train_overrides:
        config = config.replace(train_spec=with_overrides(stored.train_spec, train_overrides))
    if sizes:
        config = config.replace(sizes={**stored.sizes, **sizes})
    differences = stored.differences(config)
    if differences:
        problems.append(f"{'; '.join(differences)} (a resumed run keeps its trajectory settings; only "
                        f"{', '.join(OPERATIONAL)} may change)")
    if "data" in changes:
        config = config.replace(data=str(Path(changes["data"]).resolve()))
    if problems:
        raise InputError(f"--resume {run_dir}: " + "; ".join(problems))
    ds = _open_data(config.data)
    if ds.fingerprint != progress["data"]["fingerprint"]:
        raise InputError(f"--resume {run_dir}: data fingerprint: the run trained on {progress['data']['path']} "
                         f"({progress['data']['fingerprint']}), {config.data} is {ds.fingerprint}; give --data the "
                         "run's own shards")
    ds.check_usable(saved.spec, config.batch_size, config.block_size)
    if type(world) is distributed.World and config.devices > 1:  # the run's own --devices, kept on resume
        world = distributed.detect(config.device, config.devices)
    if config.fsdp and "fsdp" not in changes and not distributed.launched_by_torchrun():
        # the run's own --fsdp is kept under torchrun; without it the run continues in one process, the same
        # run (SPEC.md 25.7): its checkpoint holds whole tensors
        config = config.replace(fsdp=False)
        obs.note("an FSDP run resumed without torchrun: continuing it in one process")
    distributed.configure(world, config.backend, config.devices, config.fsdp)
    world.per_rank_accum(config.train_spec.grad_accum)
    if config.steps <= saved.state.step and "steps" not in changes:
        obs.note(f"the run is complete at step {saved.state.step} (steps={config.steps}); --steps N continues it")
    dropped = metrics.truncate_after(run_dir, saved.state.step) if world.is_main else 0
    if dropped:
        obs.note(f"metrics.jsonl: dropped {dropped} line(s) after the checkpoint's step {saved.state.step}")
    if config.backend != stored.backend:
        obs.note(f"resuming a {stored.backend} run in {config.backend}: equal to an uninterrupted run within "
                 "the trajectory bounds of SPEC.md 20.11, not bit for bit (SPEC.md 22.3)")
    return _Session(config, run_dir, ds, saved.spec, saved.state.params, saved, origin=progress.get("origin", ""),
                    observer=obs, world=world).run()


# -- one session of a run ---------------------------------------------------------------------------------
class _Session:
    def __init__(self, config: RunConfig, run_dir: Path, ds, spec: ModelSpec, params, saved, origin: str,
                 observer: Observer | None, world: distributed.World):
        from .. import backends as registry
        from .compile import apply_compile, check_compile

        self.config, self.run_dir, self.ds, self.spec, self.origin = config, run_dir, ds, spec, origin
        self.world = world
        self.obs = (observer or Observer()) if world.is_main else Observer()  # rank 0 alone reports
        self.backend = registry.get(config.backend)
        check_compile(self.backend.name, config.compile)
        self.device = world.device or config.device or self.backend.devices()[0]
        self.model = self.backend.build(spec, {n: np.asarray(a, np.float32) for n, a in params.items()},
                                        "float32", self.device)
        # each rank's (or device's) share of the global grad_accum: the step it runs (SPEC.md 25)
        self.rank_spec = config.train_spec.replace(grad_accum=world.per_rank_accum(config.train_spec.grad_accum))
        world.check_agree(distributed.fingerprint({k: v for k, v in config.to_dict().items() if k != "data"},
                                                  ds.fingerprint, 0 if saved is None else int(saved.state.step)))
        world.prepare(self.model)  # before the optimizer: tinygrad's moments live where the weights do
        state = None if saved is None else saved.state
        self.optimizer = self.backend.optimizer(self.model, config.train_spec, state)
        self.step = 0 if saved is None else int(saved.state.step)
        self.elapsed0 = 0.0 if saved is None else float(saved.progress.get("elapsed", 0.0))
        self.saved_step = None if saved is None else self.step
        self.compiled = apply_compile(self.backend, self.model, config.compile)
        name, accel = device_description(config.backend, self.device)
        self.peak = peak(name, accel, config.train_spec.precision)
        self.flops_token = flops_per_token(spec, config.block_size)
        self.val = None
        self.hellaswag = None
        if config.hellaswag:  # read and checked before the first step: a bad line fails now, not at the first eval
            from ..evaluation import read_examples
            from ..evaluation.run import check_vocabulary

            check_vocabulary(spec)
            self.hellaswag = read_examples(config.hellaswag, config.hellaswag_limit)

    # the run's wall time, summed over sessions
    def elapsed(self) -> float:
        return self.elapsed0 + (time.perf_counter() - self.began)

    def progress(self) -> dict[str, Any]:
        c = self.config
        return {
            "step": self.step,
            "config": c.to_dict(),
            "data": {"path": c.data, "fingerprint": self.ds.fingerprint, "seed": c.seed, "next_step": self.step,
                     "rule": "micro-batch k of step it is ds.batch('train', batch_size, block_size, seed, it, k); "
                             "under data parallel rank r computes k = r*A .. r*A + A - 1 (SPEC.md 25)"},
            "sampler": {"seed_rule": "sample seed = seed * 1000003 + step (evaluate.sample_seed)", "seed": c.seed},
            "spec_version": SPEC_VERSION, "model_spec": self.spec.to_json(),
            "train_spec": c.train_spec.to_json(), "backend": self.backend.version(), "device": self.device,
            "world": self.world.engine,  # who computed the latest steps (SPEC.md 25); not part of the run
            "elapsed": self.elapsed(), "tokens": self.step * c.tokens_per_step, "origin": self.origin,
        }

    def takes_part(self) -> bool:
        """This rank evaluates and checkpoints: rank 0, or, when the model is sharded, every rank (the
        forward and the checkpoint gather the shards; rank 0 alone records and writes)."""
        return self.world.is_main or self.world.sharded

    def save(self) -> Path | None:
        state = self.backend.optimizer_state(self.model, self.optimizer)  # sharded: a gather every rank runs
        path = None
        if self.world.is_main:
            path = checkpoint.write(self.run_dir, self.spec, self.config.train_spec, state, self.progress())
        self.saved_step = self.step
        return path

    def evaluate(self, log: metrics.MetricsLog) -> None:
        c = self.config
        t0 = time.perf_counter()
        batches = self.ds.eval_batches("val", c.batch_size, c.block_size, c.eval_iters, seed=c.seed)
        self.val = val_loss(self.backend, self.model, self.spec, batches)
        eval_s = time.perf_counter() - t0
        sample = None
        if c.sample_tokens:
            sample = sample_text(self.backend, self.model, self.spec, self.ds.tokenizer, c.sample_tokens,
                                 sample_seed(c.seed, self.step))
        record = {"kind": "eval", "step": self.step, "val_loss": self.val,
                  "val_ppl": math.exp(self.val) if self.val < 700 else math.inf,
                  "tokens": self.step * c.tokens_per_step, "time": self.elapsed(), "eval_time": eval_s,
                  "sample": sample}
        if self.hellaswag:
            from ..evaluation import evaluate

            hs = evaluate(self.backend, self.model, self.hellaswag)
            record["hellaswag"] = {"n": len(self.hellaswag), "acc": hs.acc, "acc_stderr": hs.acc_stderr,
                                   "acc_norm": hs.acc_norm, "acc_norm_stderr": hs.acc_norm_stderr,
                                   "truncated": hs.truncated}
        log.write(record)
        self.obs.evaluation(record)
        if self.world.is_main:
            from .plot import plot_run

            plot_run(self.run_dir, self.obs.note)

    def micro_batches(self, it: int):
        """This process's micro-batches of step `it`: the global micro-batches k of the rank (SPEC.md 25),
        so that W ranks of A each compute the single-process step with grad_accum W*A."""
        c = self.config
        ks = self.world.micro_indices(c.train_spec.grad_accum)
        batches = [self.ds.batch("train", c.batch_size, c.block_size, seed=c.seed, step=it, micro=k) for k in ks]
        draws = None
        if self.spec.loss == "early_exit":  # SPEC.md 18.3: the draws are an input, drawn from the run's seed
            draws = [np.random.default_rng([c.seed, it, k, 18_3]).random(
                (self.spec.n_layer, c.batch_size, c.block_size), dtype=np.float32) for k in ks]
        return distributed.micro_steps(self.world, batches, c.train_spec.grad_accum), \
            None if draws is None else distributed.micro_draws(self.world, draws, c.train_spec.grad_accum)

    def run(self) -> RunResult:
        c = self.config
        self.began = time.perf_counter()
        self.obs.begin({"config": c, "spec": self.spec, "backend": self.backend.version(), "device": self.device,
                        "world": self.world.engine,
                        "start_step": self.step, "origin": self.origin, "compile": self.compiled,
                        "peak": self.peak, "flops_per_token": self.flops_token, "run_dir": self.run_dir})
        result = RunResult(self.run_dir, "done", self.step)
        in_step = False
        with (metrics.MetricsLog(self.run_dir) if self.world.is_main else _NoLog()) as log, \
                _deferred_interrupt() as stop, contextlib.closing(self.world):
            try:
                while self.step < c.steps:
                    it = self.step
                    batches, draws = self.micro_batches(it)
                    t0 = time.perf_counter()
                    in_step = True
                    with self.world.collectives():
                        stats = self.backend.train_step(self.model, self.optimizer, self.rank_spec, it, batches, draws)
                        loss, rank_losses, any_stop = self.world.reduce_step(it, stats.loss, stats.grad_norm,
                                                                             stop.is_set())
                    in_step = False
                    dt = time.perf_counter() - t0
                    self.step = it + 1
                    result.losses.append(loss)
                    tps = c.tokens_per_step / dt if dt > 0 else math.inf
                    record = {"kind": "step", "step": self.step, "loss": loss, "lr": stats.lr,
                              "grad_norm": stats.grad_norm, "tokens": self.step * c.tokens_per_step,
                              "time": self.elapsed(), "step_time": dt, "tokens_per_s": tps,
                              "mfu": mfu(tps, self.flops_token, self.peak), "backend": c.backend}
                    if self.world.size > 1:
                        record["rank_losses"] = rank_losses  # each rank's own mean over its micro-batches
                    log.write(record)
                    self.obs.step(record)
                    last = self.step == c.steps
                    # rank 0 alone: no collective runs inside evaluation or saving (SPEC.md 25); under FSDP
                    # every rank, as each is a collective (the sharded forward, the checkpoint's gather)
                    if self.takes_part() and (self.step % c.eval_interval == 0 or last):
                        with self.world.collectives():
                            self.evaluate(log)
                    if self.takes_part() and (self.step % c.ckpt_interval == 0 or last):
                        with self.world.collectives():
                            self.save()
                    # one process: a Ctrl-C during evaluation counts too; ranks stop together, as gathered
                    if (any_stop if self.world.size > 1 else stop.is_set()) and not last:
                        self.obs.note(f"Ctrl-C: stopping after step {self.step}")
                        raise KeyboardInterrupt
                if self.takes_part() and self.saved_step != self.step:  # resumed at or past the end
                    with self.world.collectives():
                        self.save()
                with self.world.collectives():
                    self.world.barrier()  # the ranks end together: none tears the group down under rank 0's save
            except KeyboardInterrupt:
                result.status = "interrupted"
                if not in_step and self.saved_step != self.step and self.takes_part():
                    with self.world.collectives():
                        self.save()
                    result.message = f"stopped by Ctrl-C after step {self.step}; final checkpoint written"
                elif in_step:
                    result.message = (f"stopped by Ctrl-C inside step {self.step + 1}: the model may hold half a "
                                      f"step, so nothing was written from it")
                else:
                    result.message = f"stopped by Ctrl-C after step {self.step}"
            except TrainingDiverged as e:
                result.status = "diverged"
                where = f"the tensor {e.tensor!r}" if e.tensor else "the loss"
                result.message = (f"training diverged at step {e.step + 1} (it={e.step}): {where} went non-finite; "
                                  f"no checkpoint was written after it. {e}")
        result.step = self.step
        result.val_loss = self.val
        if (self.run_dir / checkpoint.NAME / checkpoint.FILES[2]).exists():
            result.checkpoint = self.run_dir / checkpoint.NAME
            result.checkpoint_step = self.saved_step
        if result.status == "done":
            result.message = f"done: {self.step} steps; checkpoint {result.checkpoint}"
        elif result.checkpoint is not None:
            result.message += f"; the last complete checkpoint is {result.checkpoint} (step {result.checkpoint_step})"
        else:
            result.message += "; no checkpoint had been written yet"
        if self.world.is_main:
            from .plot import plot_run

            plot_run(self.run_dir, self.obs.note)
        self.obs.end(result)
        return result


class _NoLog:
    """A rank other than 0 writes no metrics."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, record) -> None: ...


@contextlib.contextmanager
def _deferred_interrupt():
    """The first SIGINT sets the returned event (the loop stops after its step); a second one raises
    KeyboardInterrupt at once. Only the main thread can own the handler; elsewhere SIGINT is Python's."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
