"""The seeds' experiments as recipes (docs/experiments.md): a recipe names a few *arms* (variants of
spec/variants.py) trained under one TrainSpec on one data set, at "cpu" scale (a few layers, 128 wide,
character-level Shakespeare: minutes on a laptop CPU) or at "seed" scale (the seed's own sizes and
optimizer settings, for a GPU), with the same command:

    gptspec recipe run seed001 --scale cpu --backend torch --out runs/seed001

    seed001  softmax against softmax1 (quiet attention), judged by the perplexity ratio (5% better is interesting)
    seed000  GPT-2 against nGPT, both under nGPT's optimizer settings (TrainSpec "ngpt")
    seed002  GPT-2 against seed002-axm and the all-layer loss, the residual sizes printed at each evaluation

Every arm of a recipe starts from the init law at the same seed and reads the same batches (gptspec.runs
draws both from the run's seed), so at one seed the arms differ by their variant only; `seeds` repeats
the recipe at other seeds, which is how the noise between seeds is measured.

Arms whose recipe prints residual sizes train in segments that end at the evaluations (a run resumed in
its own backend continues bit for bit, runs/loop.py), and after each segment the checkpoint's model gives
Backend.residual_stats (SPEC.md 18.4, the seed's "SIZE COMPARISON") on the first validation batch; the
rows go to RUN_DIR/residual_stats.jsonl.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..spec import InputError
from ..spec.train import TrainSpec
from ..spec.variants import get_variant
from . import checkpoint, metrics
from .config import RunConfig
from .loop import Observer, RunResult, resume_run, train_run

SCALES = ("cpu", "seed")
RESIDUAL_FILE = "residual_stats.jsonl"


@dataclass(frozen=True)
class Scale:
    """How big a recipe runs: the model's size, the data's tokenizer, the batch and the run's length."""
    sizes: dict                # ModelSpec size fields over `model` (runs/config.py SIZE_FIELDS)
    tokenizer: str             # "char" or "gpt2": how the corpus is prepared
    batch_size: int
    block_size: int
    steps: int
    train_preset: str          # spec/train.py TRAIN_PRESETS
    train: dict                # TrainSpec fields replaced over the preset
    eval_interval: int
    eval_iters: int
    ckpt_interval: int
    model: str = "gpt2"        # the ModelSpec preset that `sizes` resizes

    def train_spec(self, seed: int | None = None) -> TrainSpec:
        ts = TrainSpec.preset(self.train_preset).replace(**self.train)
        return ts if seed is None else ts.replace(seed=seed)


@dataclass(frozen=True)
class Recipe:
    name: str
    seed_file: str             # which of the seeds (../shared/seeds/NNN_*.txt) it runs
    summary: str
    criterion: str             # how the seed judges the outcome
    arms: tuple[tuple[str, str], ...]   # (run name, variant); the first is the baseline of every ratio
    scales: dict = field(default_factory=dict)
    residual_stats: bool = False

    def scale(self, name: str) -> Scale:
        try:
            return self.scales[name]
        except KeyError:
            raise InputError(f"recipe {self.name}: unknown scale {name!r}; expected one of "
                             f"{', '.join(self.scales)}") from None

    def arm_names(self) -> list[str]:
        return [a for a, _ in self.arms]


# The CPU scale shared by every recipe: 4 layers of 128 (0.8M parameters) on characters, 16 x 64 tokens a step.
# 600 steps take about 2 minutes per arm with torch on one core of a laptop-class CPU (docs/experiments.md).
_CPU = dict(sizes={"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64}, tokenizer="char",
            batch_size=16, block_size=64, steps=600, eval_interval=100, eval_iters=10, ckpt_interval=100)
# Float32 on the CPU: bfloat16 autocast is slower there than float32, and the seeds' bf16 is a GPU economy.
_CPU_TRAIN = dict(precision="float32", grad_accum=1, max_steps=600)

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(
        "seed001", "001", "softmax against softmax1 (quiet attention) on nanoGPT's baby GPT",
        "perplexity ratio softmax1 / softmax: below 0.95 ('improved by 5%') is interesting",
        arms=(("softmax", "gpt2"), ("softmax1", "softmax1")),
        scales={
            "cpu": Scale(**_CPU, train_preset="nanogpt-shakespeare-char",
                         train=dict(_CPU_TRAIN, warmup_steps=50)),
            # the seed's table: nanoGPT's shakespeare_char config with n_embd 768, GPT-2 BPE, 100000 iterations
            "seed": Scale(sizes={"n_layer": 6, "n_head": 6, "n_embd": 768, "n_positions": 256}, tokenizer="gpt2",
                          batch_size=64, block_size=256, steps=100_000, train_preset="nanogpt-shakespeare-char",
                          train=dict(max_steps=100_000, warmup_steps=100), eval_interval=500, eval_iters=200,
                          ckpt_interval=5000),
        }),
    Recipe(
        "seed000", "000", "GPT-2 against nGPT (the normalized Transformer), both with nGPT's optimizer settings",
        "validation loss at equal steps and tokens (nGPT's claim: fewer steps to the same loss)",
        arms=(("gpt2", "gpt2"), ("ngpt", "ngpt")),
        scales={
            "cpu": Scale(**_CPU, train_preset="ngpt", train=dict(_CPU_TRAIN)),
            # GPT-2 124M shapes, 64 micro-batches of 8 x 1024 (NVIDIA/ngpt's train.py, TrainSpec "ngpt")
            "seed": Scale(sizes={}, tokenizer="gpt2", batch_size=8, block_size=1024, steps=600_000,
                          train_preset="ngpt", train={}, eval_interval=1000, eval_iters=50, ckpt_interval=2000),
        }),
    Recipe(
        "seed002", "002", "GPT-2 against seed 002's best form (seed002-axm) and the all-layer loss",
        "validation loss (the seed reads loss plots) and the residual sizes per layer at each evaluation",
        arms=(("gpt2", "gpt2"), ("axm", "seed002-axm"), ("all-layer-loss", "all-layer-loss")),
        residual_stats=True,
        scales={
            "cpu": Scale(**_CPU, train_preset="build-nanogpt-gpt2", train=dict(_CPU_TRAIN, warmup_steps=50)),
            # the seed's logs: GPT-2 124M shapes at lr 6e-4, 2**17 tokens a step (16 x 1024 x 8)
            "seed": Scale(sizes={}, tokenizer="gpt2", batch_size=16, block_size=1024, steps=5000,
                          train_preset="build-nanogpt-gpt2", train={}, eval_interval=250, eval_iters=20,
                          ckpt_interval=1000),
        }),
]}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise InputError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def arm_config(recipe: Recipe, arm: str, scale: str, backend: str, data, *, seed: int | None = None,
               steps: int | None = None, device: str | None = None) -> RunConfig:
    """The RunConfig of one arm at one scale (and seed; default the train preset's)."""
    variants = dict(recipe.arms)
    if arm not in variants:
        raise InputError(f"recipe {recipe.name} has no arm {arm!r}; its arms: {', '.join(recipe.arm_names())}")
    get_variant(variants[arm])
    s = recipe.scale(scale)
    return RunConfig(backend=backend, model=s.model, data=str(data), steps=steps or s.steps,
                     train_spec=s.train_spec(seed), variant=variants[arm], sizes=dict(s.sizes),
                     batch_size=s.batch_size, block_size=s.block_size, eval_interval=s.eval_interval,
                     eval_iters=s.eval_iters, ckpt_interval=s.ckpt_interval, device=device)


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def prepare_data(recipe: Recipe, scale: str, out, corpus: str = "shakespeare", log=lambda text: None) -> Path:
    """The recipe's shards in OUT/data-CORPUS-TOKENIZER, prepared there once and reused after."""
    from ..data.prepare import prepare
    from ..data.shards import is_shard_dir

    tokenizer = recipe.scale(scale).tokenizer
    path = Path(out) / f"data-{Path(corpus).name}-{tokenizer}"
    if not is_shard_dir(path):
        log(f"preparing {corpus} with the {tokenizer} tokenizer into {path}")
        prepare([corpus], path, tokenizer=tokenizer, log=log)
    return path


# -- the residual sizes (SPEC.md 18.4) -----------------------------------------------------------------------
def residual_record(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """Backend.residual_stats of the run's checkpoint on its first validation batch, as one JSON row."""
    from .. import backends as registry
    from ..data import TokenShards

    backend = registry.get(config.backend)
    saved = checkpoint.read(run_dir)
    model = backend.build(saved.spec, {n: np.asarray(a, np.float32) for n, a in saved.state.params.items()},
                          "float32", config.device or backend.devices()[0])
    (tokens, _), = TokenShards.open(config.data).eval_batches("val", config.batch_size, config.block_size, 1,
                                                              seed=config.seed)
    stats = backend.residual_stats(model, tokens)
    return {"step": int(saved.state.step), **{k: [float(x) for x in np.asarray(v)] for k, v in stats.items()}}


def size_comparison(record: dict[str, Any]) -> list[str]:
    """The seed's print, one line per layer: prev = the block's output, mid = its intermediate stream,
    next = ln_f of the output (SPEC.md 18.4's table)."""
    return [f"SIZE COMPARISON layer {i} prev {out:.6g} mid {mid:.6g} next {nxt:.6g}"
            for i, (out, mid, nxt) in enumerate(zip(record["output"], record["mid"], record["normed"]))]


def _log_residuals(run_dir: Path, record: dict[str, Any]) -> None:
    """Append `record`, dropping rows of later steps (left by a run that crashed after them)."""
    from ..weights.atomic import atomic_write

    rows = [r for r in read_residuals(run_dir) if r["step"] < record["step"]] + [record]
    with atomic_write(run_dir / RESIDUAL_FILE) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_residuals(run_dir) -> list[dict[str, Any]]:
    path = Path(run_dir) / RESIDUAL_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- running ------------------------------------------------------------------------------------------------
def _holds_run(run_dir: Path) -> bool:
    return (run_dir / metrics.FILE).exists() or (run_dir / checkpoint.NAME).exists()


def _resume_changes(config: RunConfig) -> dict[str, Any]:
    """Every field of `config` for resume_run: the operational ones apply, the others are checked to be the
    run's own (so a directory holding another recipe's run is refused, naming the difference)."""
    d = config.to_dict()
    d.pop("train_spec"), d.pop("sizes")
    return {k: v for k, v in d.items() if v is not None}


def train_arm(config: RunConfig, run_dir, *, force: bool = False, observer: Observer | None = None,
              on_residuals: Callable[[dict], None] | None = None) -> RunResult:
    """Train one arm into `run_dir`, continuing a run already there (the same recipe's, or an error).

    With `on_residuals` the run trains in segments ending at its evaluations, and after each the residual
    sizes of its checkpoint go to RUN_DIR/residual_stats.jsonl and to `on_residuals`."""
    run_dir = Path(run_dir)
    every = config.eval_interval if on_residuals else config.steps
    stops = list(range(every, config.steps, every)) + [config.steps]
    fresh = force or not _holds_run(run_dir)
    done = 0 if fresh else checkpoint.read(run_dir).state.step
    result = None
    for stop in stops:
        if stop <= done and not fresh:
            continue
        if fresh:
            result = train_run(config.replace(steps=stop), run_dir, force=force, observer=observer)
            fresh = False
        else:
            result = resume_run(run_dir, {**_resume_changes(config), "steps": stop},
                                train_overrides=config.train_spec.to_dict(), sizes=config.sizes, observer=observer)
        if result.status != "done":
            return result
        if on_residuals:
            record = residual_record(run_dir, config.replace(data=str(Path(config.data).resolve())))
            _log_residuals(run_dir, record)
            on_residuals(record)
    if result is None:  # every segment was done before: the run is complete
        (observer or Observer()).note(f"{run_dir} is complete at step {done}: nothing to train")
        result = resume_run(run_dir, {**_resume_changes(config), "steps": config.steps},
                            train_overrides=config.train_spec.to_dict(), sizes=config.sizes, observer=observer)
    return result


@dataclass
class ArmRun:
    arm: str
    variant: str
    seed: int
    run_dir: Path
    result: RunResult


def run_recipe(recipe: Recipe, scale: str, backend: str, out, *, data=None, corpus: str = "shakespeare",
               seeds: Sequence[int] | None = None, arms: Sequence[str] | None = None, steps: int | None = None,
               device: str | None = None, force: bool = False,
               observer: Callable[[str, int], Observer] | None = None,
               on_residuals: Callable[[str, int, dict], None] | None = None,
               log: Callable[[str], None] = lambda text: None) -> list[ArmRun]:
    """Every arm (or those named) at every seed (default: the train preset's), into OUT/ARM-seedS.
    Stops at the first arm that does not finish (diverged or interrupted) and returns what ran."""
    if scale not in SCALES:
        raise InputError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    out = Path(out)
    chosen = list(arms or recipe.arm_names())
    for a in chosen:
        if a not in dict(recipe.arms):
            raise InputError(f"recipe {recipe.name} has no arm {a!r}; its arms: {', '.join(recipe.arm_names())}")
    seeds = list(seeds) if seeds else [recipe.scale(scale).train_spec().seed]
    data_dir = Path(data) if data else prepare_data(recipe, scale, out, corpus, log)
    done = []
    for seed in seeds:
        for arm in chosen:
            config = arm_config(recipe, arm, scale, backend, data_dir, seed=seed, steps=steps, device=device)
            run_dir = out / run_name(arm, seed)
            log(f"{recipe.name} / {arm} ({config.variant}), seed {seed}: {run_dir}")
            def show(record, arm=arm, seed=seed):
                if on_residuals is not None:
                    on_residuals(arm, seed, record)
            # residual sizes go to RUN_DIR/residual_stats.jsonl whether or not they are shown
            result = train_arm(config, run_dir, force=force, observer=observer(arm, seed) if observer else None,
                               on_residuals=show if recipe.residual_stats else None)
            done.append(ArmRun(arm, config.variant, seed, run_dir, result))
            if result.status != "done":
                return done
    return done
