"""`gptspec runs compare`: one summary per run directory, and each run's ratio to the first.

Losses are cross-entropies in nats per token (natural log, SPEC.md 4), so the perplexity is e^loss.
Seed 001 writes its criterion as "perplexity (2^loss) ... improved by 5%": 2^loss is the perplexity of
a loss in bits, which these are not, so the table gives e^loss; the ratio of two perplexities is
e^(L_run - L_first) (in bits it would be 2^(L_run - L_first) for losses in bits: the same judgement
on the same model, since a loss in bits is the loss in nats / ln 2).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, metrics


@dataclass
class RunSummary:
    run_dir: Path
    train_loss: float | None     # the last step's loss
    val_loss: float | None       # the last evaluation's
    step: int
    tokens: int
    wall_time: float             # seconds, every session of the run
    backend: str
    variant: str
    model: str

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 700.0))


def summarize(run_dir) -> RunSummary:
    run_dir = Path(run_dir)
    records = metrics.read(run_dir)
    steps, evals = metrics.steps(records), metrics.evals(records)
    # a run resumed in another framework lists each, in order
    backend = " -> ".join(dict.fromkeys(r["backend"] for r in steps)) if steps else "?"
    model = variant = "?"
    progress_file = run_dir / checkpoint.NAME / checkpoint.FILES[2]
    if progress_file.exists():
        from ..spec import ModelSpec
        from ..spec.variants import variant_name

        progress = json.loads(progress_file.read_text())
        spec = ModelSpec.from_json(progress["model_spec"])
        variant = variant_name(spec)
        model = (f"{progress['config']['model']}: {spec.n_layer} layers x {spec.n_embd} wide, "
                 f"{spec.n_params / 1e6:.2f}M params")
    last = records[-1] if records else {}
    return RunSummary(run_dir, steps[-1]["loss"] if steps else None, evals[-1]["val_loss"] if evals else None,
                      int(steps[-1]["step"]) if steps else 0, int(steps[-1]["tokens"]) if steps else 0,
                      float(last.get("time", 0.0)), backend, variant, model)


def ratio(run: float | None, first: float | None) -> float | None:
    if run is None or first is None or first == 0:
        return None
    return run / first
