"""Data-parallel training (SPEC.md 25) on each framework's own engine equals one process.

W = 2 ranks (torch DDP or FSDP2 under torchrun, mx.distributed under mlx.launch) or devices (tinygrad), each with
A = 1 micro-batch, against one process with grad_accum W*A = 2 on the same global micro-batches: the
losses and gradient norms of every step and the final weights within the trajectory bounds of SPEC.md
20.11, and the run's loss the mean of the ranks' own. Every launch has a hard timeout and its process
group is killed on expiry, so a hang fails in seconds. The negative controls inject a wrong average
(runs/distributed.py GPTSPEC_DP_FAULT) and must be flagged by the same comparison.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptspec import backends as registry
from gptspec.runs import RunConfig, checkpoint, metrics
from gptspec.runs.loop import resume_run, train_run
from gptspec.spec import InputError
from gptspec.spec.tolerance import trajectory_bound
from gptspec.spec.train import TrainSpec

SEED, B, T, STEPS = 3, 2, 8, 3
RECIPE = TrainSpec(lr=1e-3, weight_decay=0.1, grad_clip=1.0, grad_accum=2, seed=SEED)
LAUNCH_TIMEOUT_S = 90
ENGINE_FLAG = {"ddp": "--no-fsdp", "fsdp": "--fsdp"}  # torch under torchrun


@pytest.fixture(scope="module")
def torch_one(shards, tmp_path_factory) -> Path:
    """The single-process torch run with grad_accum 2 (the oracle of torch's and tinygrad's runs); read-only."""
    if "torch" not in registry.available():
        pytest.skip("torch is not installed")
    return single("torch", shards, tmp_path_factory.mktemp("torch_one") / "run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(backend: str, shards: Path, out: Path, steps: int = STEPS, grad_accum: int = 2) -> list[str]:
    return ["--backend", backend, "--model", "test-tiny", "--data", str(shards), "--out", str(out),
            "--steps", str(steps), "--batch-size", str(B), "--block-size", str(T), "--grad-accum", str(grad_accum),
            "--lr", "1e-3", "--weight-decay", "0.1", "--grad-clip", "1.0", "--seed", str(SEED),
            "--eval-interval", str(steps), "--eval-iters", "1", "--sample-tokens", "0", "--ckpt-interval", str(steps)]


def launch(cmd: list[str], env: dict | None = None, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; past `timeout` the whole group is killed and the test fails."""
    full_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GPTSPEC_DP_TIMEOUT": "20", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... hung past {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, " ".join(out.split()), "")  # unwrapped console lines


def torchrun(args: list[str], env: dict | None = None, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "gptspec", "train", *args],
                  env, **kw)


def mlx_launch(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = shutil.which("mlx.launch")
    return launch([launcher, "-n", "2", "--starting-port", str(free_port()), "--", sys.executable, "-m", "gptspec",
                   "train", *args], env)


def steps_of(run_dir: Path) -> list[dict]:
    return metrics.steps(metrics.read(run_dir))


def worst(got: list[dict], want: list[dict], key: str, quantity: str) -> list[tuple[float, float]]:
    """(error, bound) per step: relative error of `key` against its trajectory bound (pairwise: two runs)."""
    return [(abs(g[key] - w[key]) / abs(w[key]), trajectory_bound("float32", i, quantity, "rel_max", pairwise=True))
            for i, (g, w) in enumerate(zip(got, want), start=1)]


def assert_same_run(parallel: Path, single: Path) -> None:
    """The data-parallel run is the single-process one: every step's loss and gradient norm, the final
    weights, within SPEC.md 20.11's bounds; its loss is the mean of the ranks' own losses."""
    got, want = steps_of(parallel), steps_of(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for key, quantity in (("loss", "train_loss"), ("grad_norm", "train_grad_norm")):
        for step, (err, bound) in enumerate(worst(got, want, key, quantity), start=1):
            assert err <= bound, f"step {step}: {key} {got[step - 1][key]} vs one process {want[step - 1][key]}"
    for r in got:
        if "rank_losses" in r:
            assert len(r["rank_losses"]) == 2 and r["loss"] == pytest.approx(np.mean(r["rank_losses"]), rel=1e-7)
    a, b = checkpoint.read(parallel).state, checkpoint.read(single).state
    assert a.step == b.step == STEPS
    bound = trajectory_bound("float32", STEPS, "train_weights", "rel_l2", pairwise=True)
    for name in b.params:
        err = np.linalg.norm(a.params[name] - b.params[name]) / np.linalg.norm(b.params[name])
        assert err <= bound, f"{name}: final weights differ by {err} (bound {bound})"


def single(backend: str, shards: Path, out: Path, steps: int = STEPS) -> Path:
    train_run(RunConfig(backend=backend, model="test-tiny", data=str(shards), steps=steps, train_spec=RECIPE,
                        batch_size=B, block_size=T, eval_interval=steps, eval_iters=1, ckpt_interval=steps,
                        sample_tokens=0, compile=False if backend != "tinygrad" else None), out)
    return out


def needs(name: str):
    return pytest.mark.skipif(name not in registry.available(), reason=f"{name} is not installed")


# -- the proof ----------------------------------------------------------------------------------------------------
@needs("torch")
def test_torch_ddp_is_one_process_with_grad_accum_2(shards, torch_one, tmp_path):
    done = torchrun([*train_args("torch", shards, tmp_path / "ddp"), "--no-compile"])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "torch DDP (gloo, 2 ranks)" in done.stdout
    assert_same_run(tmp_path / "ddp", torch_one)
    # the checkpoint is an ordinary one: it resumes on one device, no launcher, as the same run
    rest = resume_run(tmp_path / "ddp", {"steps": STEPS + 1})
    same = resume_run(shutil.copytree(torch_one, tmp_path / "one"), {"steps": STEPS + 1})
    assert rest.status == "done" and len(rest.losses) == 1
    bound = trajectory_bound("float32", STEPS + 1, "train_loss", "rel_max", pairwise=True)
    assert abs(rest.losses[0] - same.losses[0]) / same.losses[0] <= bound


@needs("torch")
def test_torch_fsdp_is_one_process_with_grad_accum_2(shards, torch_one, tmp_path):
    done = torchrun([*train_args("torch", shards, tmp_path / "fsdp"), "--no-compile", "--fsdp"])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "torch FSDP2 fully_shard (gloo, 2 ranks)" in done.stdout
    assert_same_run(tmp_path / "fsdp", torch_one)
    assert_same_state(tmp_path / "fsdp", torch_one, STEPS)  # gathered from the shards, whole, by rank 0
    # the sharded run's checkpoint is an ordinary one: it resumes on one device, no launcher, as the same run
    rest = resume_run(tmp_path / "fsdp", {"steps": STEPS + 1})
    same = resume_run(shutil.copytree(torch_one, tmp_path / "one"), {"steps": STEPS + 1})
    assert rest.status == "done" and len(rest.losses) == 1
    bound = trajectory_bound("float32", STEPS + 1, "train_loss", "rel_max", pairwise=True)
    assert abs(rest.losses[0] - same.losses[0]) / same.losses[0] <= bound
    assert "FSDP" not in checkpoint.read(tmp_path / "fsdp").progress["world"]  # step 4 ran in one process


@needs("torch")
def test_torch_fsdp_resumes_a_one_process_checkpoint(shards, torch_one, tmp_path):
    # every rank reads the whole checkpoint and keeps its shard of the weights and of AdamW's moments; every
    # rank evaluates and samples (the sharded forward is a collective) and rank 0 alone writes
    run = shutil.copytree(torch_one, tmp_path / "run")
    done = torchrun(["--resume", str(run), "--steps", str(STEPS + 1), "--sample-tokens", "4", "--fsdp"])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "torch FSDP2 fully_shard (gloo, 2 ranks)" in done.stdout and "sample:" in done.stdout
    same = resume_run(shutil.copytree(torch_one, tmp_path / "one"), {"steps": STEPS + 1})
    got = steps_of(run)[-1]
    assert got["step"] == STEPS + 1 and len(got["rank_losses"]) == 2
    bound = trajectory_bound("float32", STEPS + 1, "train_loss", "rel_max", pairwise=True)
    assert abs(got["loss"] - same.losses[0]) / same.losses[0] <= bound, (got["loss"], same.losses[0])
    bound = trajectory_bound("float32", STEPS + 1, "train_grad_norm", "rel_max", pairwise=True)
    want = steps_of(tmp_path / "one")[-1]["grad_norm"]
    assert abs(got["grad_norm"] - want) / want <= bound, (got["grad_norm"], want)
    # the loss and norm of step 4 are computed before its update: the loaded moments show in its result
    assert_same_state(run, tmp_path / "one", STEPS + 1)


def assert_same_state(parallel: Path, single: Path, steps: int) -> None:
    """The weights and AdamW's m and v in the two final checkpoints, within SPEC.md 20.11's pairwise bounds."""
    a, b = checkpoint.read(parallel).state, checkpoint.read(single).state
    assert a.step == b.step == steps
    for group, quantity in (("params", "train_weights"), ("m", "train_m"), ("v", "train_v")):
        bound = trajectory_bound("float32", steps, quantity, "rel_l2", pairwise=True)
        for name, want in getattr(b, group).items():
            err = np.linalg.norm(getattr(a, group)[name] - want) / np.linalg.norm(want)
            assert err <= bound, f"{group}[{name}]: differs by {err} (bound {bound})"


@needs("mlx")
def test_mlx_distributed_is_one_process_with_grad_accum_2(shards, tmp_path):
    done = mlx_launch([*train_args("mlx", shards, tmp_path / "ring"), "--no-compile"])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "mx.distributed (2 ranks)" in done.stdout
    assert_same_run(tmp_path / "ring", single("mlx", shards, tmp_path / "one"))


@needs("tinygrad")
@needs("torch")
def test_tinygrad_on_two_devices_is_one_process_with_grad_accum_2(shards, torch_one, tmp_path):
    # the oracle is torch's single process (a tinygrad one costs another ~30 s of kernel compiles here):
    # the bounds are the pairwise ones, as between any two frameworks' runs (SPEC.md 20.11)
    done = launch([sys.executable, "-m", "gptspec", "train", *train_args("tinygrad", shards, tmp_path / "dev"),
                   "--devices", "2"], timeout=240)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "CPU:1, CPU:2" in done.stdout
    assert_same_run(tmp_path / "dev", torch_one)


# -- negative controls: a wrong average is flagged by the same comparison ---------------------------------------
@needs("torch")
@pytest.mark.parametrize("engine, divisor", [("ddp", 3), ("ddp", 1), ("fsdp", 3)])
def test_a_wrong_world_size_in_the_average_is_flagged(shards, torch_one, tmp_path, engine, divisor, request):
    # DDP with W + 1 by default; the SUM unaveraged, and FSDP's reduce-scatter divided by W + 1, under --tier heavy
    if (engine, divisor) != ("ddp", 3) and request.config.getoption("--tier") != "heavy":
        pytest.skip("the second wrong divisor and FSDP's: --tier heavy (DDP's W + 1 runs by default)")
    done = torchrun([*train_args("torch", shards, tmp_path / "bad"), "--no-compile", ENGINE_FLAG[engine]],
                    {"GPTSPEC_DP_FAULT": f"divide_by:{divisor}"})
    assert done.returncode == 0, done.stdout[-3000:]
    with pytest.raises(AssertionError, match="grad_norm"):
        assert_same_run(tmp_path / "bad", torch_one)


@needs("torch")
def test_a_skipped_sync_stops_the_run_naming_the_rank(shards, tmp_path):
    start = time.monotonic()
    done = torchrun([*train_args("torch", shards, tmp_path / "bad"), "--no-compile"], {"GPTSPEC_DP_FAULT": "skip_sync"})
    assert done.returncode != 0
    assert "rank 1's gradient norm" in done.stdout and "not synchronized" in done.stdout, done.stdout[-3000:]
    assert time.monotonic() - start < 60


@needs("mlx")
def test_mlx_skipped_sync_stops_the_run_naming_the_rank(shards, tmp_path):
    done = mlx_launch([*train_args("mlx", shards, tmp_path / "bad"), "--no-compile"], {"GPTSPEC_DP_FAULT": "skip_sync"})
    # mlx.launch 0.32 exits 0 whatever its ranks did: it reports their codes (and stops the other rank once one
    # has failed, so only the first to fail may print the error)
    assert "rank 1's gradient norm" in done.stdout and "exited with code 2" in done.stdout, done.stdout[-3000:]
    assert "bundled reference BLAS" not in done.stdout  # the backend, and its BLAS, load before mlx.core


# -- Ctrl-C under the launcher ------------------------------------------------------------------------------------
@needs("torch")
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_ctrl_c_under_torchrun_leaves_a_resumable_checkpoint(shards, tmp_path, engine, request):
    if request.config.getoption("--tier") != "heavy":
        pytest.skip("Ctrl-C under torchrun: --tier heavy")
    run = tmp_path / "run"
    args = [*train_args("torch", shards, run, steps=100_000), "--no-compile", "--ckpt-interval", "1",
            "--log-interval", "1", ENGINE_FLAG[engine]]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GPTSPEC_DP_TIMEOUT": "20", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                             "127.0.0.1", "--master_port", str(free_port()), "-m", "gptspec", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        for line in proc.stdout:  # rank 0 reports step 3: the ranks are training, checkpoints exist
            if line.startswith("step 3/"):
                break
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: torchrun and both ranks get it
        _finish([proc], LAUNCH_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # whatever the ranks had done when the signal came (a final checkpoint, or the last interval's), the run
    # continues on one device from its last complete checkpoint as the same run
    saved = checkpoint.read(run).state.step
    assert saved >= 3
    rest = resume_run(run, {"steps": saved + 1})
    fresh = single("torch", shards, tmp_path / "one", steps=saved + 1)
    assert rest.status == "done" and [r["step"] for r in steps_of(run)] == list(range(1, saved + 2))
    want = steps_of(fresh)[-1]["loss"]
    bound = trajectory_bound("float32", saved + 1, "train_loss", "rel_max", pairwise=True)
    assert abs(rest.losses[0] - want) / want <= bound, (rest.losses[0], want)


# -- bad input, clear and fast ----------------------------------------------------------------------------------
@needs("torch")
def test_a_world_size_that_does_not_divide_grad_accum_is_refused(shards, tmp_path):
    done = torchrun([*train_args("torch", shards, tmp_path / "odd", grad_accum=3), "--no-compile"])
    assert done.returncode != 0
    assert "grad_accum=3" in done.stdout and "world size 2" in done.stdout, done.stdout[-3000:]


def test_devices_divide_grad_accum_and_belong_to_tinygrad(shards, tmp_path):
    base = RunConfig(backend="torch", model="test-tiny", data=str(shards), steps=1, train_spec=RECIPE,
                     batch_size=B, block_size=T, devices=2)
    with pytest.raises(InputError, match="--devices 2 is tinygrad's"):
        train_run(base, tmp_path / "a")
    with pytest.raises(InputError, match=r"grad_accum=3 .* device count 2"):
        train_run(base.replace(backend="tinygrad", train_spec=RECIPE.replace(grad_accum=3)), tmp_path / "b")


def test_fsdp_is_torch_under_torchrun(shards, tmp_path):
    base = RunConfig(backend="torch", model="test-tiny", data=str(shards), steps=1, train_spec=RECIPE,
                     batch_size=B, block_size=T, fsdp=True)
    with pytest.raises(InputError, match="--fsdp shards the model over the ranks torchrun starts"):
        train_run(base, tmp_path / "a")  # no launcher
    with pytest.raises(InputError, match="--fsdp .* needs --backend torch under torchrun, not --backend mlx"):
        train_run(base.replace(backend="mlx"), tmp_path / "b")


def _by_hand(rank: int, port: int, args: list[str], timeout_s: int = 5) -> subprocess.Popen:
    """One rank of a 2-rank torch run started without torchrun (torchrun gives every rank the same args)."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "GPTSPEC_DP_TIMEOUT": str(timeout_s), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gptspec", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(" ".join(p.communicate(timeout=timeout)[0].split()))
        except subprocess.TimeoutExpired:
            for q in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"a rank hung past {timeout} s")
    return outs


@needs("torch")
def test_ranks_that_disagree_on_the_config_fail_naming_the_rank(shards, tmp_path):
    port = free_port()
    args = [*train_args("torch", shards, tmp_path / "run"), "--no-compile"]
    procs = [_by_hand(0, port, args), _by_hand(1, port, [*args, "--lr", "2e-3"])]
    outs = _finish(procs, 60)
    assert all(p.returncode != 0 for p in procs)
    assert "rank(s) 1 run another config or data than rank 0" in outs[0], outs[0][-3000:]


@needs("torch")
def test_a_rank_that_never_comes_stops_the_others_within_the_timeout(shards, tmp_path):
    port = free_port()
    args = [*train_args("torch", shards, tmp_path / "run"), "--no-compile"]
    start = time.monotonic()
    alone = _by_hand(0, port, args, timeout_s=2)  # rank 1 died before the rendezvous
    out = _finish([alone], 60)[0]
    assert alone.returncode != 0 and time.monotonic() - start < 45
    assert "could not start rank 0 of 2" in out and "1/2 clients joined" in out, out[-3000:]


@needs("torch")
def test_a_rank_that_dies_mid_run_stops_the_others_within_the_timeout(shards, tmp_path):
    port = free_port()
    args = [*train_args("torch", shards, tmp_path / "run", steps=100_000), "--no-compile", "--log-interval", "1"]
    procs = [_by_hand(0, port, args), _by_hand(1, port, args)]
    try:
        for line in procs[0].stdout:  # rank 0 reports step 1: both ranks are training
            if line.startswith("step 1/"):
                break
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        out = _finish(procs[:1], 60)[0]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[0].returncode != 0 and time.monotonic() - killed < 30, out[-3000:]
    assert "rank 0 of 2: a collective failed" in out, out[-3000:]


@needs("torch")
def test_a_port_in_use_is_a_clear_error(shards, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                       "127.0.0.1", "--master_port", str(port), "-m", "gptspec", "train",
                       *train_args("torch", shards, tmp_path / "run"), "--no-compile"], timeout=60)
    assert done.returncode != 0
    assert "address already in use" in done.stdout.lower() or "EADDRINUSE" in done.stdout, done.stdout[-3000:]
