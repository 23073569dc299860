"""The seeds' recipes (gptspec.runs.recipes, `gptspec recipe`) and the cross-framework run check
(gptspec.runs.agreement). Runs here are tiny (test-tiny's width, a few steps on the vendored slice);
the heavy tier runs 200 steps of the seed001 CPU recipe in torch and MLX and checks their curves agree."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gptspec import backends as registry
from gptspec import cli
from gptspec.data import TokenShards
from gptspec.data.prepare import prepare
from gptspec.runs import checkpoint, metrics
from gptspec.runs.agreement import FINAL_TOLERANCES, compare_curves
from gptspec.runs.loop import train_run
from gptspec.runs.recipes import (RECIPES, arm_config, get_recipe, read_residuals, run_name, size_comparison,
                                  train_arm)
from gptspec.spec import InputError, reference
from gptspec.spec.tolerance import bound, trajectory_bound
from gptspec.spec.variants import VARIANTS

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 16}


def tiny(recipe: str, arm: str, backend: str, shards: Path, steps: int = 4, **changes):
    """An arm of a recipe shrunk to a few seconds: test sizes, 4 x 16 tokens a step."""
    c = arm_config(get_recipe(recipe), arm, "cpu", backend, shards, steps=steps)
    return c.replace(sizes=dict(TINY), batch_size=4, block_size=16, eval_interval=2, eval_iters=2, ckpt_interval=2,
                     sample_tokens=0, compile=False, **changes)


# -- the recipes are the seeds' experiments ----------------------------------------------------------------
def test_each_recipe_runs_the_seeds_arms_and_settings():
    """Against the seeds' own texts (../shared/seeds): seed 001's table, seed 000's nGPT optimizer, seed 002's arms."""
    for r in RECIPES.values():
        for _, variant in r.arms:
            assert variant in VARIANTS
        cpu = r.scale("cpu")
        assert 2 <= cpu.sizes["n_layer"] <= 6 and 128 <= cpu.sizes["n_embd"] <= 384 and cpu.tokenizer == "char"
        assert cpu.train_spec().precision == "float32"
    s001 = get_recipe("seed001")
    assert dict(s001.arms) == {"softmax": "gpt2", "softmax1": "softmax1"}
    seed = s001.scale("seed")
    ts = seed.train_spec()
    # the seed's table: batch 64, block 256, 6 layers, 6 heads, n_embd 768, lr 1e-3, warmup 100, min_lr 1e-4,
    # betas (0.9, 0.99), clip 1.0, bfloat16, GPT-2's tiktoken encoding, 100000 iterations
    assert (seed.batch_size, seed.block_size, seed.tokenizer) == (64, 256, "gpt2")
    assert {k: seed.sizes[k] for k in ("n_layer", "n_head", "n_embd")} == {"n_layer": 6, "n_head": 6, "n_embd": 768}
    assert (ts.lr, ts.warmup_steps, ts.min_lr, ts.betas, ts.grad_clip, ts.precision, ts.max_steps) == (
        1e-3, 100, pytest.approx(1e-4), (0.9, 0.99), 1.0, "mixed_bfloat16", 100_000)
    s000 = get_recipe("seed000")
    assert dict(s000.arms) == {"gpt2": "gpt2", "ngpt": "ngpt"}
    for scale in ("cpu", "seed"):  # both arms under nGPT's settings: no weight decay, no warmup
        ts = s000.scale(scale).train_spec()
        assert (ts.weight_decay, ts.decay, ts.warmup_steps, ts.min_lr_ratio) == (0.0, "none", 0, 0.0)
    s002 = get_recipe("seed002")
    assert dict(s002.arms) == {"gpt2": "gpt2", "axm": "seed002-axm", "all-layer-loss": "all-layer-loss"}
    assert s002.residual_stats and s002.scale("seed").train_spec().lr == 6e-4
    assert s002.scale("seed").batch_size * s002.scale("seed").block_size * s002.scale("seed").train_spec().grad_accum \
        == 2 ** 17  # the seed's logs: 131072 tokens a step


def test_recipe_list_shows_every_recipe_at_both_scales(capsys):
    assert cli.main(["recipe", "list"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert out.count(name) >= 3  # a row per scale, and its summary line
    assert "16,384 x 100,000" in out and "1,024 x 600" in out  # seed001 at the seed's scale and at the CPU's


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(InputError, match="known recipes: seed001, seed000, seed002"):
        get_recipe("seed009")
    with pytest.raises(InputError, match="its arms: softmax, softmax1"):
        arm_config(get_recipe("seed001"), "sinks", "cpu", "torch", "data")
    with pytest.raises(InputError, match="unknown scale 'gpu'"):
        get_recipe("seed001").scale("gpu")


# -- residual sizes at each evaluation, by segments that change nothing ---------------------------------------
def test_segments_change_nothing_and_residual_sizes_are_the_references(shards, tmp_path):
    """An arm trained in segments (to print residual sizes at its evaluations) is bit for bit the straight run,
    and the sizes it logs are the float64 reference's residual_stats of the checkpoint at that step."""
    config = tiny("seed002", "axm", "torch", shards)
    straight = train_run(config, tmp_path / "straight")
    seen = []
    segmented = train_arm(config, tmp_path / "segmented", on_residuals=seen.append)
    assert segmented.status == "done" and straight.status == "done"
    curve = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in metrics.read(tmp_path / "straight")]
    assert [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"))
            for r in metrics.read(tmp_path / "segmented")] == curve
    a, b = checkpoint.read(tmp_path / "straight").state, checkpoint.read(tmp_path / "segmented").state
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    assert [r["step"] for r in seen] == [2, 4] and read_residuals(tmp_path / "segmented") == seen

    saved = checkpoint.read(tmp_path / "segmented")
    (tokens, _), = TokenShards.open(shards).eval_batches("val", 4, 16, 1, seed=config.seed)
    want = reference.residual_stats(saved.spec, {n: np.asarray(v, np.float32) for n, v in saved.state.params.items()},
                                    tokens)
    for key in ("input", "mid", "output", "normed"):
        err = np.abs(np.array(seen[-1][key]) - want[key]).max() / np.abs(want[key]).max()
        assert err <= bound("float32", "stats", "rel_max"), (key, seen[-1][key], want[key])
    assert size_comparison(seen[-1])[1] == (f"SIZE COMPARISON layer 1 prev {seen[-1]['output'][1]:.6g} "
                                            f"mid {seen[-1]['mid'][1]:.6g} next {seen[-1]['normed'][1]:.6g}")


def test_a_directory_holding_another_recipes_run_is_refused(shards, tmp_path):
    train_arm(tiny("seed001", "softmax", "torch", shards, steps=2), tmp_path / "run")
    other = tiny("seed001", "softmax1", "torch", shards, steps=2)
    with pytest.raises(InputError, match="variant: 'gpt2' -> 'softmax1'"):
        train_arm(other, tmp_path / "run")


def test_recipe_run_trains_every_arm_and_seed_and_continues(shards, tmp_path, capsys):
    """The command end to end at its real CPU size, two steps: every arm at both seeds, the comparison and the
    criterion's ratios (e^(L_arm - L_baseline), the perplexity ratio), and a second call trains nothing again."""
    args = ["recipe", "run", "seed001", "--scale", "cpu", "--backend", "torch", "--out", str(tmp_path),
            "--data", str(shards), "--steps", "1", "--seed", "5", "--seed", "6"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    val = {}
    for arm in ("softmax", "softmax1"):
        for seed in (5, 6):
            records = metrics.read(tmp_path / run_name(arm, seed))
            assert [r["step"] for r in metrics.steps(records)] == [1]
            val[arm, seed] = metrics.evals(records)[-1]["val_loss"]
    for seed in (5, 6):
        assert f"{math.exp(val['softmax1', seed] - val['softmax', seed]):.4f}" in out
    spread = math.exp(abs(val["softmax", 5] - val["softmax", 6]))
    assert f"a factor {spread:.4f} across seeds 5, 6" in out
    paired = [math.exp(val["softmax1", seed] - val["softmax", seed]) for seed in (5, 6)]
    assert f"the paired perplexity ratio ranges {min(paired):.4f}..{max(paired):.4f} over 2 seeds" in out
    assert (tmp_path / "compare.png").exists() or "matplotlib is not installed" in out
    before = (tmp_path / run_name("softmax", 5) / metrics.FILE).read_text()
    assert cli.main(args) == 0
    assert (tmp_path / run_name("softmax", 5) / metrics.FILE).read_text() == before
    assert "is complete at step 1: nothing to train" in capsys.readouterr().out


# -- the cross-framework run check ---------------------------------------------------------------------------
def _two_backends() -> tuple[str, str]:
    have = registry.available()
    pair = [b for b in ("torch", "mlx", "tinygrad") if b in have][:2]
    if len(pair) < 2:
        pytest.skip(f"needs two backends; installed: {', '.join(have) or 'none'}")
    return pair[0], pair[1]


@pytest.fixture(scope="module")
def two_runs(shards, tmp_path_factory):
    a, b = _two_backends()
    root = tmp_path_factory.mktemp("xfw")
    for name in (a, b):
        train_run(tiny("seed001", "softmax", name, shards, steps=6), root / name)
    return root / a, root / b


def test_two_backends_agree_step_by_step_within_the_trajectory_bounds(two_runs):
    ag = compare_curves(*two_runs)
    assert ag.ok, [f"{c.what}: {c.a} vs {c.b} ({c.error:.2e} > {c.bound:.0e})" for c in ag.failures]
    assert ag.steps == 6 and ag.per_step_until == 6
    assert [c.what for c in ag.checks][:2] == ["step 1 train_loss", "step 1 train_grad_norm"]
    assert ag.checks[-1].what == "final eval (step 6) val_loss"


def _edit_metrics(run_dir: Path, step: int, key: str, factor: float, kind: str = "step") -> None:
    path = run_dir / metrics.FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if r["kind"] == kind and r["step"] == step:
            r[key] *= factor
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_curve_that_leaves_the_bounds_fails_the_check(two_runs, tmp_path, capsys):
    """A loss 3x the pairwise bound off at step 3, a gradient norm off at step 5, a final val loss off by 2x
    the final tolerance: each is named, and the command exits 1."""
    import shutil

    a, b = two_runs
    for step, key, factor, kind, what in (
            (3, "loss", 1 + 3 * trajectory_bound("float32", 3, "train_loss", "rel_max", pairwise=True), "step",
             "step 3 train_loss"),
            (5, "grad_norm", 1 + 3 * trajectory_bound("float32", 5, "train_grad_norm", "rel_max", pairwise=True),
             "step", "step 5 train_grad_norm"),
            (6, "val_loss", 1 + 2 * FINAL_TOLERANCES["float32"], "eval", "final eval (step 6) val_loss")):
        broken = tmp_path / f"{key}{step}"
        shutil.copytree(b, broken)
        _edit_metrics(broken, step, key, factor, kind)
        ag = compare_curves(a, broken)
        assert [c.what for c in ag.failures] == [what]
        capsys.readouterr()
        assert cli.main(["recipe", "check", str(a), str(broken)]) == 1
        assert "1 check(s) failed" in capsys.readouterr().out


def test_runs_of_different_recipes_are_not_compared(shards, two_runs, tmp_path):
    a, _ = two_runs
    other = tiny("seed001", "softmax", "torch", shards, steps=2)
    train_run(other.replace(train_spec=other.train_spec.replace(lr=2e-3)), tmp_path / "other")
    with pytest.raises(InputError, match=r"not the same recipe.*train_spec.lr: 0.001 -> 0.002"):
        compare_curves(a, tmp_path / "other")


@pytest.mark.skipif(not {"torch", "mlx"} <= set(registry.available()), reason="needs torch and mlx")
def test_heavy_200_steps_of_the_seed001_cpu_recipe_agree_in_torch_and_mlx(tier, tmp_path):
    """docs/experiments.md's measurement: the CPU recipe at its full size, 200 steps, on the vendored slice."""
    if tier != "heavy":
        pytest.skip("heavy tier: 200 steps of the seed001 CPU recipe in two backends (minutes)")
    data = tmp_path / "data"
    prepare(["shakespeare-slice"], data, tokenizer="char")
    for name in ("torch", "mlx"):
        train_run(arm_config(get_recipe("seed001"), "softmax", "cpu", name, data, steps=200), tmp_path / name)
    ag = compare_curves(tmp_path / "torch", tmp_path / "mlx")
    assert ag.ok, [f"{c.what}: {c.a} vs {c.b} ({c.error:.2e} > {c.bound:.0e})" for c in ag.failures]
