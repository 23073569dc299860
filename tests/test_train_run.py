"""`gptspec train` (gptspec.runs): the loop adds nothing to Backend.train's step, resume is bitwise in one
backend and within the trajectory bounds across backends, checkpoints load everywhere and survive failed
writes, Ctrl-C and divergence stop cleanly, metrics.jsonl reads as one run, `runs compare` and the CLI.

Every run is test-tiny (8 wide, 1 layer) on character shards of the vendored Shakespeare slice."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from gptspec import backends as registry
from gptspec import cli
from gptspec.data import TokenShards
from gptspec.data.prepare import prepare
from gptspec.runs import RunConfig, checkpoint, metrics
from gptspec.runs.compare import summarize
from gptspec.runs.loop import resume_run, train_run
from gptspec.spec import SPEC_VERSION, InputError, ModelSpec, WeightsError
from gptspec.spec.tolerance import trajectory_bound
from gptspec.spec.train import TrainSpec, lr_at
from gptspec.weights import synthetic_params

SEED, B, T, ACCUM = 3, 2, 8, 2
# build-nanogpt's settings at a small scale: warmup, cosine to its floor, clipping, decay, 2 micro-batches
RECIPE = TrainSpec(lr=1e-3, schedule="cosine", warmup_steps=1, max_steps=3, betas=(0.9, 0.95), weight_decay=0.1,
                   grad_clip=1.0, grad_accum=ACCUM, seed=SEED)


def config(backend: str, shards: Path, steps: int = 4, **changes) -> RunConfig:
    return RunConfig(backend=backend, model="test-tiny", data=str(shards), steps=steps, train_spec=RECIPE,
                     batch_size=B, block_size=T, eval_interval=2, eval_iters=1, ckpt_interval=2, sample_tokens=4,
                     compile=False).replace(**changes)


def states_equal(a, b) -> list[str]:
    """The tensors in which two TrainStates differ in any bit (empty: identical)."""
    diff = [] if a.step == b.step else [f"step {a.step} != {b.step}"]
    for group in ("params", "m", "v"):
        x, y = getattr(a, group), getattr(b, group)
        diff += [f"{group}/{n}" for n in x if not np.array_equal(x[n], y[n])]
    return diff


def crash_at_checkpoint(monkeypatch, step: int):
    """checkpoint.write that dies (as a killed process would) when asked to write `step`."""
    real = checkpoint.write

    def write(run_dir, spec, train_spec, state, progress):
        if state.step == step:
            raise RuntimeError(f"killed before the checkpoint of step {step}")
        return real(run_dir, spec, train_spec, state, progress)

    monkeypatch.setattr(checkpoint, "write", write)


# -- the loop is Backend.train, and resumes bit for bit ----------------------------------------------------------
def test_loop_is_backend_train_and_resume_is_bitwise(backend, shards, tmp_path, monkeypatch):
    # one evaluation (at the end) and a short sample: tinygrad compiles the kernels of each once more
    quick = dict(eval_interval=4, sample_tokens=2)
    straight = train_run(config(backend.name, shards, **quick), tmp_path / "straight")
    assert straight.status == "done" and straight.step == 4

    # the oracle: Backend.train on the same initial weights (the init law) and the same batches
    spec = ModelSpec.preset("test-tiny").replace(vocab_size=TokenShards.open(shards).vocab_size)
    ds = TokenShards.open(shards)
    batches = [[ds.batch("train", B, T, seed=SEED, step=i, micro=k) for k in range(ACCUM)] for i in range(4)]
    model = backend.build(spec, synthetic_params(spec, SEED, init="gpt2"))
    oracle = backend.train(model, RECIPE, batches)
    assert straight.losses == oracle.losses
    assert states_equal(checkpoint.read(tmp_path / "straight").state, oracle.state) == []

    # 2 steps, a run killed after step 3's metrics but before its checkpoint, a resume to 4
    crash_at_checkpoint(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        train_run(config(backend.name, shards, ckpt_interval=1, **quick), tmp_path / "resumed")
    monkeypatch.undo()
    assert checkpoint.read(tmp_path / "resumed").state.step == 2
    rest = resume_run(tmp_path / "resumed")
    assert rest.losses == straight.losses[2:]
    assert states_equal(checkpoint.read(tmp_path / "resumed").state, oracle.state) == []

    def curve(run):  # metrics.jsonl without the timings: it reads as the uninterrupted run's
        return [(r["kind"], r["step"], r.get("loss"), r.get("lr"), r.get("val_loss"), r.get("sample"))
                for r in metrics.read(tmp_path / run)]
    assert curve("resumed") == curve("straight")


@pytest.mark.skipif(not {"torch", "mlx"} <= set(registry.available()), reason="needs torch and mlx")
def test_a_torch_run_resumed_in_mlx_stays_within_the_trajectory_bounds(shards, tmp_path):
    straight = train_run(config("torch", shards), tmp_path / "torch")
    train_run(config("torch", shards, steps=2), tmp_path / "mixed")
    rest = resume_run(tmp_path / "mixed", {"backend": "mlx", "steps": 4})
    assert rest.status == "done" and len(rest.losses) == 2
    for step, (got, want) in enumerate(zip(rest.losses, straight.losses[2:]), start=3):
        limit = trajectory_bound("float32", step, "train_loss", "rel_max", pairwise=True)
        assert abs(got - want) / abs(want) <= limit, f"step {step}: mlx {got} vs torch {want} (bound {limit})"
    assert [r["backend"] for r in metrics.steps(metrics.read(tmp_path / "mixed"))] == ["torch"] * 2 + ["mlx"] * 2
    assert summarize(tmp_path / "mixed").backend == "torch -> mlx"


def test_the_checkpoint_loads_in_every_backend(shards, tmp_path):
    train_run(config("torch", shards, steps=2), tmp_path / "run")
    saved = checkpoint.read(tmp_path / "run")
    for name in registry.available():
        b = registry.get(name)
        held = b.state(registry.load(name, tmp_path / "run" / "checkpoint" / "model.safetensors"))
        for n, a in saved.state.params.items():
            assert np.array_equal(held[n], a.astype(np.float32)), f"{name}: {n}"


def test_metrics_jsonl_holds_every_step_and_eval(shards, tmp_path):
    result = train_run(config("torch", shards, steps=3, eval_interval=2), tmp_path / "run")
    records = metrics.read(tmp_path / "run")
    steps, evals = metrics.steps(records), metrics.evals(records)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["loss"] for r in steps] == result.losses
    assert [r["tokens"] for r in steps] == [s * B * T * ACCUM for s in (1, 2, 3)]
    for r in steps:
        assert {"lr", "grad_norm", "time", "step_time", "tokens_per_s", "mfu", "backend"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["mfu"] is not None and r["mfu"] > 0
    assert [r["lr"] for r in steps] == [lr_at(RECIPE, it) for it in range(3)]
    assert [r["step"] for r in evals] == [2, 3]  # every eval_interval, and at the end
    for r in evals:
        assert math.isclose(r["val_ppl"], math.exp(r["val_loss"])) and isinstance(r["sample"], str)
    assert result.val_loss == evals[-1]["val_loss"]


def test_validation_loss_is_the_cross_entropy_of_the_logits(shards, tmp_path):
    """The eval's loss against the backend's own loss on the same validation batch (an independent path)."""
    train_run(config("torch", shards, steps=1, eval_iters=1), tmp_path / "run")
    saved = checkpoint.read(tmp_path / "run")
    b = registry.get("torch")
    model = b.build(saved.spec, {n: a.astype(np.float32) for n, a in saved.state.params.items()})
    (tokens, targets), = TokenShards.open(shards).eval_batches("val", B, T, 1, seed=SEED)
    val = metrics.evals(metrics.read(tmp_path / "run"))[-1]["val_loss"]
    assert abs(val - b.loss_and_grads(model, tokens, targets).loss) < 1e-5


def test_fine_tuning_starts_from_the_checkpoint(shards, tmp_path):
    train_run(config("torch", shards, steps=2), tmp_path / "pretrain")
    source = tmp_path / "pretrain" / "checkpoint" / "model.safetensors"
    tuned = train_run(config("torch", shards, model=str(source), steps=1, train_spec=RECIPE.replace(seed=5)),
                      tmp_path / "tune")
    b, saved = registry.get("torch"), checkpoint.read(tmp_path / "pretrain")
    model = b.build(saved.spec, {n: a.astype(np.float32) for n, a in saved.state.params.items()})
    ds = TokenShards.open(shards)
    oracle = b.train(model, RECIPE.replace(seed=5), [[ds.batch("train", B, T, seed=5, step=0, micro=k)
                                                      for k in range(ACCUM)]])
    assert tuned.losses == oracle.losses  # fresh moments, step 0, the checkpoint's weights
    with pytest.raises(InputError, match="is a checkpoint .* --n-layer cannot change it"):
        train_run(config("torch", shards, model=str(source), sizes={"n_layer": 2}), tmp_path / "resized")


# -- runs compare ------------------------------------------------------------------------------------------------
def test_runs_compare_gives_each_runs_ratio_to_the_first(shards, tmp_path, capsys):
    train_run(config("torch", shards, steps=2), tmp_path / "a")
    train_run(config("torch", shards, steps=2, train_spec=RECIPE.replace(lr=3e-3)), tmp_path / "b")
    a, b = (metrics.evals(metrics.read(tmp_path / r))[-1]["val_loss"] for r in "ab")
    capsys.readouterr()
    assert cli.main(["runs", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--png", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert f"{b / a:.4f}" in out and f"{math.exp(b - a):.4f}" in out and f"{math.exp(b):.3f}" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


# -- bad input ---------------------------------------------------------------------------------------------------
def test_a_directory_without_shards_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises((InputError, WeightsError), match="empty"):
        train_run(config("torch", tmp_path / "empty"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, message", [
    (dict(sizes={"vocab_size": 10}), "tokenizer has 65 ids but the model's vocabulary has 10"),
    (dict(block_size=32), "block_size 32 is larger than the model's n_positions 16"),
])
def test_data_the_model_cannot_train_on_is_refused(shards, tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        train_run(config("torch", shards, **changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_shards_too_small_for_one_batch_are_refused(tmp_path):
    (tmp_path / "few.txt").write_text("To be, or not to be: that is the question.\n")
    prepare([str(tmp_path / "few.txt")], tmp_path / "few", tokenizer="char", val_fraction=0.2)
    with pytest.raises(InputError, match="too few for one batch"):
        train_run(config("torch", tmp_path / "few", block_size=16), tmp_path / "run")


def test_resume_refuses_another_data_model_or_spec_version(shards, tmp_path):
    train_run(config("torch", shards, steps=2), tmp_path / "run")
    other = tmp_path / "other"
    prepare(["shakespeare-slice"], other, tokenizer="char", val_fraction=0.2)
    with pytest.raises(InputError, match="data fingerprint"):
        resume_run(tmp_path / "run", {"data": str(other), "steps": 3})
    with pytest.raises(InputError, match="model: the run trains 'test-tiny'"):
        resume_run(tmp_path / "run", {"model": "test-mini", "steps": 3})
    with pytest.raises(InputError, match=r"batch_size: 2 -> 3"):
        resume_run(tmp_path / "run", {"batch_size": 3, "steps": 3})
    progress = tmp_path / "run" / "checkpoint" / "progress.json"
    doc = json.loads(progress.read_text())
    progress.write_text(json.dumps(dict(doc, spec_version="0")))
    with pytest.raises(InputError, match=f"spec version: .*'0'.* {SPEC_VERSION!r}"):
        resume_run(tmp_path / "run", {"steps": 3})


def test_a_failed_checkpoint_write_keeps_the_previous_one(shards, tmp_path, monkeypatch):
    """Disk full in the middle of the optimizer state: the step-2 checkpoint survives, the error names the file."""
    import gptspec.runs.checkpoint as ck

    real = ck.save_state

    def full_disk(path, spec, train_spec, state):
        if state.step > 2:
            Path(path).write_bytes(b"\0" * 100)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, spec, train_spec, state)

    train_run(config("torch", shards, steps=2), tmp_path / "run")
    before = {f: (tmp_path / "run" / "checkpoint" / f).read_bytes() for f in checkpoint.FILES}
    monkeypatch.setattr(ck, "save_state", full_disk)
    with pytest.raises(WeightsError, match=r"optimizer\.safetensors: No space left on device; the previous "
                                           r"checkpoint .* \(step 2\) is intact"):
        resume_run(tmp_path / "run", {"steps": 4})
    assert {f: (tmp_path / "run" / "checkpoint" / f).read_bytes() for f in checkpoint.FILES} == before
    assert not list((tmp_path / "run").glob("checkpoint.*"))


def test_a_crash_between_the_renames_is_recovered(shards, tmp_path):
    train_run(config("torch", shards, steps=2), tmp_path / "run")
    run = tmp_path / "run"
    os.rename(run / "checkpoint", run / "checkpoint.old-0000")   # the old one moved aside, the new one not in yet
    (run / "checkpoint.tmp-1111").mkdir()                         # and a half-written one from an earlier crash
    (run / "checkpoint.tmp-1111" / "model.safetensors").write_bytes(b"\0" * 10)
    assert checkpoint.read(run).state.step == 2
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint"]


def test_ctrl_c_finishes_the_step_and_writes_a_final_checkpoint(shards, tmp_path, monkeypatch, capsys):
    torch_backend = registry.get("torch")
    real = torch_backend.train_step

    def interrupted(model, optimizer, train_spec, it, *args):
        if it == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3
        return real(model, optimizer, train_spec, it, *args)

    monkeypatch.setattr(torch_backend, "train_step", interrupted)
    code = cli.main(["train", "--backend", "torch", "--model", "test-tiny", "--data", str(shards), "--out",
                     str(tmp_path / "run"), "--steps", "6", "--batch-size", "2", "--block-size", "8",
                     "--ckpt-interval", "2", "--eval-interval", "100", "--seed", str(SEED), "--no-compile"])
    assert code == 130
    out = capsys.readouterr().out
    assert "stopped by Ctrl-C after step 3; final checkpoint written" in out and str(tmp_path / "run") in out
    saved = checkpoint.read(tmp_path / "run")
    assert saved.state.step == 3
    assert [r["step"] for r in metrics.steps(metrics.read(tmp_path / "run"))] == [1, 2, 3]


def test_an_interrupt_inside_a_step_writes_nothing_from_it(shards, tmp_path, monkeypatch):
    torch_backend = registry.get("torch")
    real = torch_backend.train_step

    def half_a_step(model, optimizer, train_spec, it, *args):
        if it == 2:
            with __import__("torch").no_grad():
                next(model.parameters()).add_(1.0)  # half an update: the model holds no step's weights
            raise KeyboardInterrupt
        return real(model, optimizer, train_spec, it, *args)

    monkeypatch.setattr(torch_backend, "train_step", half_a_step)
    result = train_run(config("torch", shards, steps=6), tmp_path / "run")
    assert result.status == "interrupted" and "nothing was written" in result.message
    assert result.checkpoint_step == 2 and checkpoint.read(tmp_path / "run").state.step == 2


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(shards, tmp_path):
    # lr 1e30: the first update moves every weight by ~1e30; the next forward squares them (LayerNorm): inf
    huge = RECIPE.replace(lr=1e30, warmup_steps=0, schedule="constant", max_steps=None, min_lr_ratio=0.1,
                          grad_clip=None)
    result = train_run(config("torch", shards, steps=4, ckpt_interval=1, train_spec=huge), tmp_path / "run")
    assert result.status == "diverged"
    assert result.message.startswith("training diverged at step 2 (it=1)")
    assert checkpoint.read(tmp_path / "run").state.step == 1
    assert all(np.isfinite(a).all() for a in checkpoint.read(tmp_path / "run").state.params.values())


def test_an_out_dir_holding_a_run_is_refused_unless_forced(shards, tmp_path):
    train_run(config("torch", shards, steps=1), tmp_path / "run")
    with pytest.raises(InputError, match="already holds a run .*model test-tiny, checkpoint at step 1.*--resume"):
        train_run(config("torch", shards, steps=2), tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert train_run(config("torch", shards, steps=2), tmp_path / "run", force=True).step == 2
    assert [r["step"] for r in metrics.steps(metrics.read(tmp_path / "run"))] == [1, 2]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


# -- the command line --------------------------------------------------------------------------------------------
def test_gptspec_train_end_to_end(shards, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--backend", "torch", "--model", "test-tiny", "--data", str(shards), "--out", str(run),
            "--steps", "3", "--batch-size", "2", "--block-size", "8", "--grad-accum", "2", "--lr", "1e-3",
            "--schedule", "cosine", "--warmup", "1", "--eval-interval", "2", "--eval-iters", "1",
            "--seed", str(SEED), "--no-compile"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "done: 3 steps" in out and "eval step 2" in out and "MFU" in out
    saved = checkpoint.read(run)
    assert saved.state.step == 3 and saved.train_spec == TrainSpec(lr=1e-3, schedule="cosine", warmup_steps=1,
                                                                    max_steps=3, grad_accum=2, seed=SEED)
    assert cli.main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert checkpoint.read(run).state.step == 4
    assert cli.main(argv) == 2  # the directory holds a run now
    assert "already holds a run" in capsys.readouterr().out


# -- compiled steps ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_a_compiled_run_stays_within_the_trajectory_bounds_of_the_eager_one(name, shards, tmp_path, request):
    if name not in registry.available():
        pytest.skip(f"{name} is not installed")
    if name == "torch" and request.config.getoption("--tier") != "heavy":
        pytest.skip("torch.compile takes minutes to compile on a 2-core CPU: --tier heavy")
    eager = train_run(config(name, shards, eval_interval=4, sample_tokens=0), tmp_path / "eager")
    compiled = train_run(config(name, shards, eval_interval=4, sample_tokens=0, compile=True), tmp_path / "compiled")
    for step, (got, want) in enumerate(zip(compiled.losses, eager.losses), start=1):
        limit = trajectory_bound("float32", step, "train_loss", "rel_max", pairwise=True)
        assert abs(got - want) / abs(want) <= limit, f"step {step}: compiled {got} vs eager {want} (bound {limit})"
    resumed = resume_run(tmp_path / "compiled", {"steps": 6})  # a compiled run resumes compiled
    assert resumed.status == "done" and len(resumed.losses) == 2


def test_tinygrad_refuses_compile_with_the_reason(shards, tmp_path):
    if "tinygrad" not in registry.available():
        pytest.skip("tinygrad is not installed")
    from gptspec.spec import BackendError

    with pytest.raises(BackendError, match="TinyJit of the step would apply the update before the finiteness check"):
        train_run(config("tinygrad", shards, compile=True), tmp_path / "run")


# -- --hellaswag: multiple-choice accuracy at each evaluation (SPEC.md 23) ------------------------------------
def test_hellaswag_is_scored_at_each_evaluation(tmp_path):
    from test_hellaswag import RECORDS, oracle_losses, write_jsonl

    from gptspec.tokenizer import get_encoding

    bpe = tmp_path / "shk_gpt2"
    prepare(["shakespeare-slice"], bpe, tokenizer="gpt2")
    data = write_jsonl(tmp_path / "hs.jsonl", RECORDS)
    run = train_run(config("torch", bpe, steps=2, ckpt_interval=2, sample_tokens=0, hellaswag=data,
                           sizes={"n_positions": 64}), tmp_path / "run")
    assert run.status == "done"
    evals = [r for r in metrics.read(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2]
    got = evals[0]["hellaswag"]
    # the oracle: the float64 reference on the final weights, each ending scored on its own, unpadded
    saved = checkpoint.read(tmp_path / "run")
    params = {n: np.asarray(a, np.float64) for n, a in saved.state.params.items()}
    losses = [oracle_losses(saved.spec, params, r) for r in RECORDS]
    enc = get_encoding("gpt2")
    lengths = [[len(enc.encode(" " + x)) for x in r["endings"]] for r in RECORDS]
    acc = np.mean([int(np.argmin(l)) == r["label"] for l, r in zip(losses, RECORDS)])
    acc_norm = np.mean([int(np.argmin(np.array(l) / n)) == r["label"] for l, n, r in zip(losses, lengths, RECORDS)])
    assert got["n"] == len(RECORDS) and got["truncated"] == 1
    assert (got["acc"], got["acc_norm"]) == (acc, acc_norm)


def test_a_bad_hellaswag_file_fails_before_the_first_step(shards, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}\n')
    bpe = tmp_path / "shk_gpt2"
    prepare(["shakespeare-slice"], bpe, tokenizer="gpt2")
    with pytest.raises(InputError, match=r"bad.jsonl:1: .*label"):
        train_run(config("torch", bpe, hellaswag=str(bad)), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
