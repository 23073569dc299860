"""A run's checkpoint (SPEC.md 22.2): RUN_DIR/checkpoint/ with three files,

    model.safetensors      the weights, canonical format, float32 (gptspec.backends.load reads it anywhere)
    optimizer.safetensors  spec.reference.save_state's file: weights, m, v in float64, the step, both specs
    progress.json          the step, the data position, the RNG rule of the samples, the config, versions

Written into a new directory beside it (checkpoint.tmp-XXXX, progress.json last, so a directory
holding progress.json is complete) and swapped in by two renames (checkpoint -> checkpoint.old-XXXX,
tmp -> checkpoint), then the old one removed. A crash at any instant leaves one complete checkpoint
(the old, the new, or both) and leftovers that `recover` resolves the next time the run is opened.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import ModelSpec, WeightsError
from ..spec.reference.training import TrainState, load_state, save_state
from ..spec.train import TrainSpec
from ..weights.atomic import atomic_write

NAME = "checkpoint"
FILES = ("model.safetensors", "optimizer.safetensors", "progress.json")
_TMP, _OLD = f"{NAME}.tmp-", f"{NAME}.old-"


@dataclass
class Saved:
    spec: ModelSpec
    train_spec: TrainSpec
    state: TrainState
    progress: dict[str, Any]
    path: Path


def write(run_dir: Path, spec: ModelSpec, train_spec: TrainSpec, state: TrainState, progress: dict) -> Path:
    """Write a complete checkpoint and swap it in; on any failure the previous one is left as it was and
    the error names the file that could not be written."""
    from ..weights import save

    run_dir = Path(run_dir)
    tmp = run_dir / f"{_TMP}{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    current = None
    try:
        current = tmp / FILES[0]
        save(current, spec, {n: np.asarray(a, np.float32) for n, a in state.params.items()}, "float32",
             origin=f"gptspec train, step {state.step}")
        current = tmp / FILES[1]
        save_state(current, spec, train_spec, state)
        current = tmp / FILES[2]
        with atomic_write(current) as f:
            Path(f).write_text(json.dumps(progress, indent=1, sort_keys=True) + "\n")
        current = run_dir / NAME
        _swap(tmp, run_dir / NAME)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = run_dir / NAME
        kept = (f"the previous checkpoint {previous} (step {_step_of(previous)}) is intact"
                if (previous / FILES[2]).exists() else "no earlier checkpoint exists")
        raise WeightsError(f"writing the checkpoint failed at {current}: {e.strerror or e}; {kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / NAME


def _swap(new: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f"{_OLD}{secrets.token_hex(4)}")
        os.rename(dest, old)
    os.rename(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:  # the renames reach the disk with the directory
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


def _step_of(d: Path) -> int | str:
    try:
        return json.loads((d / FILES[2]).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "?"


def describe(run_dir: Path) -> str:
    """One line about the run in `run_dir`, for messages: its backend, model and checkpoint step."""
    try:
        progress = json.loads((Path(run_dir) / NAME / FILES[2]).read_text())
        c = progress["config"]
        return f"backend {c['backend']}, model {c['model']}, checkpoint at step {progress['step']}"
    except (OSError, ValueError, KeyError):
        return "no complete checkpoint"


def recover(run_dir: Path) -> list[str]:
    """Resolve what an interrupted write left: keep the newest complete checkpoint as RUN_DIR/checkpoint
    and remove every temporary or old directory. Returns what it did, for the run's log."""
    run_dir = Path(run_dir)
    dest = run_dir / NAME
    leftovers = sorted(p for p in run_dir.glob(f"{NAME}.*-*") if p.is_dir()
                       and p.name.startswith((_TMP, _OLD)))
    done = []
    if not dest.exists():
        # a crash between the two renames: the new (tmp, complete) is newer than the old
        for prefix in (_TMP, _OLD):
            found = [p for p in leftovers if p.name.startswith(prefix) and _complete(p)]
            if found:
                best = max(found, key=lambda p: _step_of(p) if isinstance(_step_of(p), int) else -1)
                os.rename(best, dest)
                leftovers.remove(best)
                done.append(f"restored the complete checkpoint {best.name} (step {_step_of(dest)}) as {NAME}/")
                break
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, left by an interrupted checkpoint write")
    return done


def read(run_dir: Path) -> Saved:
    """The run's last complete checkpoint, after `recover`."""
    run_dir = Path(run_dir)
    recover(run_dir)
    path = run_dir / NAME
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise WeightsError(f"{run_dir} holds no complete checkpoint: {path} lacks {', '.join(missing)}")
    from ..weights import read as read_weights

    progress = json.loads((path / FILES[2]).read_text())
    weights = read_weights(path / FILES[0])
    spec, train_spec, state = load_state(path / FILES[1], weights.spec)
    for name, a in weights.params.items():  # the two files must be one checkpoint
        if not np.array_equal(np.asarray(a, np.float64), state.params[name]):
            raise WeightsError(f"{path}: {FILES[0]} and {FILES[1]} disagree on {name!r}; the checkpoint is damaged")
    if int(progress.get("step", -1)) != state.step:
        raise WeightsError(f"{path}: progress.json says step {progress.get('step')}, the optimizer state "
                           f"{state.step}; the checkpoint is damaged")
    return Saved(spec, train_spec, state, progress, path)
