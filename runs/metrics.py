"""RUN_DIR/metrics.jsonl: one JSON object per line, appended and flushed as the run goes.

    {"kind": "step", "step": 12, "loss": ..., "lr": ..., "grad_norm": ..., "tokens": ..., "time": ...,
     "step_time": ..., "tokens_per_s": ..., "mfu": ..., "backend": "torch"}
    {"kind": "eval", "step": 100, "val_loss": ..., "val_ppl": ..., "eval_time": ..., "sample": "..."}

`step` counts optimizer steps done (1 after the first update); `tokens` the training tokens seen so
far; `time` the run's wall time in seconds, summed over every session of a resumed run. On resume the
lines after the checkpoint's step are dropped, so the file reads as one run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from ..spec import InputError
from ..weights.atomic import atomic_write

FILE = "metrics.jsonl"


def _plain(v):
    """JSON has no NaN or Inf: a diverged loss is recorded as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / FILE
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise InputError(f"{run_dir} is not a gptspec run: it has no {FILE}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            # a line cut by a crash mid-write can only be the last one
            if i == len(path.read_text(encoding="utf-8").splitlines()):
                break
            raise InputError(f"{path}, line {i}: not JSON: {line[:80]!r}") from None
    return out


def truncate_after(run_dir: Path, step: int) -> int:
    """Keep the records of steps <= `step` (the checkpoint's); returns how many were dropped."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return 0
    records = read(run_dir)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    with atomic_write(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return len(records) - len(kept)


def steps(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "step"]


def evals(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "eval"]
