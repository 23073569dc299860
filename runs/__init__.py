"""Training runs (SPEC.md 22): `gptspec train` and `gptspec runs compare`.

    config.py      RunConfig: what a run is (backend, model, data, batch, steps, intervals, TrainSpec)
    model.py       the run's model: a preset through the spec's init law, or a checkpoint (fine-tuning)
    loop.py        the loop, written once over the Backend API, so every backend runs the same loop
    checkpoint.py  the run directory's checkpoint: written beside, swapped in by renames, read back
    metrics.py     metrics.jsonl: one JSON object per step and per evaluation, truncated on resume
    evaluate.py    validation loss and the text sample at each evaluation
    throughput.py  tokens/s and MFU (PaLM's flops per token against a stated peak)
    compile.py     torch.compile / mx.compile of the step, and each backend's measured default
    plot.py        loss-curve PNGs (matplotlib, the `plot` extra)
    compare.py     the table and the overlay of `gptspec runs compare`
    recipes.py     the seeds' experiments as recipes (`gptspec recipe run`)
    agreement.py   two runs of one recipe in two backends, step by step (`gptspec runs check`)
"""
from .config import RunConfig
from .loop import Observer, RunResult, resume_run, train_run

__all__ = ["RunConfig", "RunResult", "Observer", "train_run", "resume_run"]
