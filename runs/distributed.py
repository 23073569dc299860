"""Data-parallel training (SPEC.md 25): the world a run trains in, on each framework's own engine.

W-way data parallel with A micro-batches per rank is the single-process step with grad_accum W*A:
rank r's micro-batch k of step `it` is ds.batch("train", B, T, seed, step=it, micro=r*A + k), each rank
averages its A micro-batch gradients (loss / A), and the engine averages the W ranks (SUM, then / W).
The run's TrainSpec keeps the global grad_accum W*A; a rank's step runs with grad_accum A.

- torch: DDP under torchrun, found from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) as
  nanoGPT does; gloo on CPU, NCCL on CUDA. With --fsdp, FSDP2's fully_shard instead (SPEC.md 25.7): the
  weights, gradients and moments sharded over the ranks, the same step.
- MLX: mx.distributed under mlx.launch (MLX_RANK in the environment); nn.average_gradients.
- tinygrad: one process over N devices (RunConfig.devices): parameters replicated, each micro-step's
  W micro-batches concatenated and sharded on axis 0; the all-reduce happens in backward.

Only rank 0 writes (metrics, checkpoints) and evaluates; every rank runs every collective, and no
collective sits inside evaluation. Under FSDP (World.sharded) no rank holds the whole model: every rank
evaluates (the forward gathers each block's weights) and takes part in each checkpoint's gather, and rank 0
alone writes. Each step every rank's (loss, grad norm) is gathered: the run's loss
is their mean and the gradient norms (taken after the sync) must be bit-equal, else the run stops
naming the rank that differs. At the start the ranks compare a hash of the config and the data.

GPTSPEC_DP_FAULT (negative controls only, tests/test_distributed.py): "divide_by:N" averages the
gradients with N in place of W, "skip_sync" never synchronizes them; read once, at set-up.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import os

import numpy as np

from ..spec import BackendError, InputError

FAULT_ENV = "GPTSPEC_DP_FAULT"
#: torch: how long a collective waits for a rank before the run fails (a dead or hung rank); MLX's ring has
#: no timeout, mlx.launch stops the other ranks when one exits
#: the other ranks wait in their next collective while rank 0 evaluates and checkpoints, so it must exceed
#: the longest evaluation (gloo's own default, 30 minutes)
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "GPTSPEC_DP_TIMEOUT", 1800.0


class World:
    """One process on one device: rank 0 of 1."""

    rank, size, shards = 0, 1, 1
    engine = "single process"
    device: str | None = None         # the device this rank must use (torchrun on CUDA: cuda:LOCAL_RANK)
    sharded = False                   # FSDP: the model is spread over the ranks, so evaluating and
                                      # checkpointing are collectives every rank runs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def per_rank_accum(self, grad_accum: int) -> int:
        """A = grad_accum / W micro-batches each rank (or device) takes per step."""
        if grad_accum % self.size:
            raise InputError(f"grad_accum={grad_accum} (the global micro-batch count) must be a multiple of the "
                             f"world size {self.size}: each of the {self.size} ranks takes grad_accum / "
                             f"{self.size} micro-batches (SPEC.md 25)")
        return grad_accum // self.size

    def micro_indices(self, grad_accum: int) -> list[int]:
        """The global micro-batch numbers this rank computes: r*A .. r*A + A - 1."""
        a = self.per_rank_accum(grad_accum)
        return list(range(self.rank * a, self.rank * a + a))

    def prepare(self, model) -> None:
        """Set the model up for the engine (wrap, replicate); nothing for one process."""

    def all_gather(self, values) -> np.ndarray:
        """(size, n) float64: every rank's `values`, in rank order, on every rank."""
        return np.asarray(values, np.float64)[None]

    def close(self) -> None: ...

    def collectives(self):
        """Where the engine's collectives run: a rank that died or hung becomes a BackendError naming this rank."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        self.all_gather([0.0])

    # -- what every engine shares -----------------------------------------------------------------
    def check_agree(self, fingerprint: str) -> None:
        """Every rank must run the same config on the same data: compare a hash at the start."""
        mine = int(fingerprint[:12], 16)  # 48 bits: exact in float64
        hashes = self.all_gather([float(mine)])[:, 0]
        odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if odd:
            raise InputError(f"data parallel: rank(s) {', '.join(map(str, odd))} run another config or data than "
                             f"rank 0 (config+data hash {int(hashes[odd[0]]):012x} vs {int(hashes[0]):012x}): "
                             "launch every rank with the same arguments and shards")

    def reduce_step(self, it: int, loss: float, grad_norm: float,
                    stopping: bool = False) -> tuple[float, list[float], bool]:
        """The step's loss over the world (the mean of the ranks' means: SUM, then / W), every rank's own
        loss, and whether any rank was asked to stop (Ctrl-C reaches the ranks at different steps; they
        stop together after the same one). The gradient norm is taken after the sync, so it must be the
        same bits on every rank."""
        rows = self.all_gather([loss, grad_norm, float(stopping)])
        odd = [r for r in range(self.size) if rows[r, 1] != rows[0, 1]]
        if odd:
            raise BackendError(
                f"data parallel: at step {it + 1} rank {odd[0]}'s gradient norm {float(rows[odd[0], 1])!r} differs "
                f"from rank 0's {float(rows[0, 1])!r}: the ranks' gradients were not synchronized (the weights now "
                "differ)")
        return float(rows[:, 0].sum() / self.size), [float(x) for x in rows[:, 0]], bool(rows[:, 2].any())


def fingerprint(config_dict: dict, data_fingerprint: str, step: int) -> str:
    text = json.dumps({"config": config_dict, "data": data_fingerprint, "step": step}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fault() -> tuple[str, int | None] | None:
    """The injected fault of a negative control, or None (the normal path)."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    if value == "skip_sync":
        return ("skip_sync", None)
    if value.startswith("divide_by:"):
        return ("divide_by", int(value.split(":", 1)[1]))
    raise InputError(f"{FAULT_ENV}={value!r}: expected 'divide_by:N' or 'skip_sync'")


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


# -- torch: DDP under torchrun ------------------------------------------------------------------------------
class TorchWorld(World):
    engine = "torch DDP"

    def __init__(self, device: str | None):
        import torch
        import torch.distributed as dist

        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
        self.device = f"cuda:{self.local_rank}" if cuda else (device or "cpu")
        if cuda:
            torch.cuda.set_device(self.local_rank)
        self.backend = "nccl" if cuda else "gloo"
        self.use_fsdp(False)
        try:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.size,
                                    timeout=datetime.timedelta(seconds=timeout_s()))
        except Exception as e:  # the rendezvous: a port in use, an unreachable master
            raise BackendError(f"torch.distributed could not start rank {self.rank} of {self.size} "
                               f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT="
                               f"{os.environ.get('MASTER_PORT')}): {e}") from e
        self.dist = dist

    def use_fsdp(self, fsdp: bool) -> None:
        """DDP (replicated weights) or FSDP2 (sharded weights): the engine, chosen once the run's config is known."""
        self.sharded = fsdp
        self.engine = (f"torch {'FSDP2 fully_shard' if fsdp else 'DDP'} ({self.backend}, {self.size} "
                       f"rank{'s' * (self.size != 1)})")

    def prepare(self, model) -> None:
        from ..backends.torch.train import attach_ddp, attach_fsdp

        (attach_fsdp if self.sharded else attach_ddp)(model, fault())
        self.model = model

    def all_gather(self, values) -> np.ndarray:
        import torch

        mine = torch.tensor(np.asarray(values, np.float64), device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        with self.collectives():
            self.dist.all_gather(out, mine)
        return torch.stack(out).cpu().numpy()

    @contextlib.contextmanager
    def collectives(self):
        try:
            yield
        except RuntimeError as e:  # gloo: the peer's socket closed; NCCL: the watchdog's timeout
            text = str(e)
            if not (isinstance(e, self.dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Connection"))):
                raise
            raise BackendError(f"data parallel, rank {self.rank} of {self.size}: a collective failed, so another "
                               f"rank died or stopped answering (timeout {timeout_s():g} s, {TIMEOUT_ENV}): "
                               f"{text.splitlines()[0]}") from e

    def close(self) -> None:
        # DDP's wrapper and the model hold each other, so without this its reducer (and a comm hook) is freed
        # by the collector during interpreter shutdown, which now and then aborted a rank at exit ("terminate
        # called without an active exception", under the divide_by control): free it while Python is whole
        model = self.__dict__.pop("model", None)
        if model is not None:
            model.__dict__.pop("_ddp", None)
            gc.collect()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


# -- MLX: mx.distributed under mlx.launch -------------------------------------------------------------------
class MlxWorld(World):
    def __init__(self):
        from ..backends.mlx import blas

        blas.ensure_loaded()  # first: an optimised BLAS must be loaded before mlx.core
        import mlx.core as mx

        self.group = mx.distributed.init(strict=True)
        self.rank, self.size = self.group.rank(), self.group.size()
        self.engine = f"mx.distributed ({self.size} rank{'s' * (self.size != 1)})"

    def prepare(self, model) -> None:
        from ..backends.mlx.train import attach_group

        attach_group(model, self.group, fault())

    def all_gather(self, values) -> np.ndarray:
        import mlx.core as mx

        # float32 on the wire (MLX's CPU collectives have no float64): each value split into a high and
        # a low float32 so that the float64 comes back exactly enough for a bitwise comparison of float32s
        v = np.asarray(values, np.float64)
        hi = v.astype(np.float32)
        lo = (v - hi.astype(np.float64)).astype(np.float32)
        out = mx.distributed.all_gather(mx.array(np.stack([hi, lo])[None]), group=self.group,
                                        stream=mx.cpu)
        got = np.array(out, np.float64)
        return got[:, 0] + got[:, 1]


# -- tinygrad: one process, several devices -------------------------------------------------------------------
class DevicesWorld(World):
    """tinygrad over N devices in one process: rank 0 of 1 (it alone logs), N shards of each micro-step."""

    def __init__(self, device: str, n: int):
        base = device.split(":")[0]
        self.devices = tuple(f"{base}:{i}" for i in range(1, n + 1)) if base == "CPU" else \
            tuple(f"{base}:{i}" for i in range(n))
        self.shards = n
        self.engine = f"tinygrad data parallel over {', '.join(self.devices)}"

    def per_rank_accum(self, grad_accum: int) -> int:
        if grad_accum % self.shards:
            raise InputError(f"grad_accum={grad_accum} (the global micro-batch count) must be a multiple of the "
                             f"device count {self.shards}: each micro-step shards {self.shards} micro-batches over "
                             f"the {self.shards} devices (SPEC.md 25)")
        return grad_accum // self.shards

    def micro_indices(self, grad_accum: int) -> list[int]:
        return list(range(grad_accum))  # all of them, in one process: see micro_steps

    def prepare(self, model) -> None:
        from ..backends.tinygrad.train import replicate

        replicate(model, self.devices)


def micro_steps(world: World, batches: list, grad_accum: int) -> list:
    """What one process's step takes. Ranks: its own A micro-batches as they are. tinygrad's devices: A
    micro-steps, micro-step k the concatenation of global micro-batches d*A + k over the devices d."""
    if world.shards == 1:
        return batches
    a = world.per_rank_accum(grad_accum)
    return [tuple(np.concatenate([batches[d * a + k][i] for d in range(world.shards)]) for i in range(2))
            for k in range(a)]


def micro_draws(world: World, draws: list, grad_accum: int) -> list:
    """loss="early_exit"'s (n_layer, B, T) draws, grouped as micro_steps groups the batches (rows: axis 1)."""
    if world.shards == 1:
        return draws
    a = world.per_rank_accum(grad_accum)
    return [np.concatenate([draws[d * a + k] for d in range(world.shards)], axis=1) for k in range(a)]


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ  # nanoGPT's test: torchrun, even with one rank


def detect(device: str | None, devices: int) -> World:
    """The world this process trains in, from its launcher's environment: torchrun's (RANK, WORLD_SIZE),
    mlx.launch's (MLX_RANK), else tinygrad's --devices N in one process, else one process."""
    if launched_by_torchrun():
        return TorchWorld(device)
    if "MLX_RANK" in os.environ:
        return MlxWorld()
    if devices > 1:
        return DevicesWorld(device or "CPU", devices)
    return World()


def check_backend(world: World, backend: str, devices: int, fsdp: bool = False) -> None:
    """The backend must be the launcher's framework, and --fsdp torch's under torchrun (a clear error, before
    any model is built)."""
    if fsdp and backend != "torch":
        raise InputError(f"--fsdp shards the model with torch's fully_shard: it needs --backend torch under "
                         f"torchrun, not --backend {backend} (docs/distributed.md)")
    if fsdp and not isinstance(world, TorchWorld):
        raise InputError("--fsdp shards the model over the ranks torchrun starts, but this process was not "
                         "launched by torchrun (no RANK and WORLD_SIZE in its environment): run torchrun "
                         "--nproc_per_node=N -m gptspec train ... --fsdp (docs/distributed.md)")
    launcher = {TorchWorld: ("torch", "torchrun"), MlxWorld: ("mlx", "mlx.launch"),
                DevicesWorld: ("tinygrad", "--devices N")}.get(type(world))
    if devices != 1 and backend != "tinygrad":
        raise InputError(f"--devices {devices} is tinygrad's one-process data parallelism; {backend} runs data "
                         f"parallel under its launcher ({'torchrun' if backend == 'torch' else 'mlx.launch'}), "
                         "see docs/distributed.md")
    if launcher and launcher[0] != backend:
        raise InputError(f"launched by {launcher[1]} ({world.engine}) but --backend {backend}: torch runs under "
                         "torchrun, mlx under mlx.launch, tinygrad with --devices N (docs/distributed.md)")


def configure(world: World, backend: str, devices: int, fsdp: bool) -> None:
    """check_backend, then the engine the run asks for: under torchrun, DDP or (fsdp) FSDP2."""
    check_backend(world, backend, devices, fsdp)
    if isinstance(world, TorchWorld):
        world.use_fsdp(fsdp)
