"""Conformance across machines: record artifacts, compare them, refuse what cannot be compared.

    gptspec conformance record --out artifacts/            # on machine A
    pytest tests/test_artifacts.py --artifacts artifacts/  # on machine B: A's runs against B's and the reference
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptspec import backends, cli
from gptspec.conformance import artifact_file, crossmachine, runner
from gptspec.conformance.artifact_file import ArtifactError
from gptspec.conformance.cases import Case
from gptspec.conformance.cases import _checkpoint as cached_checkpoint
from gptspec.conformance.report import failure_text, write_artifact_report
from gptspec.spec import param_table, reference
from gptspec.weights import round_to_dtype, save
from gptspec.weights.format import fingerprint

LOCAL = [b for b in ("torch", "mlx") if b in backends.available()]
needs_backend = pytest.mark.skipif(not LOCAL, reason="needs torch or mlx installed")


# -- artifacts given with --artifacts DIR: each against the reference and this machine's backends -----
def pytest_generate_tests(metafunc):
    if "artifact_path" not in metafunc.fixturenames:
        return
    where = metafunc.config.getoption("--artifacts")
    if where is None:
        params = [pytest.param(None, marks=pytest.mark.skip(reason="pass --artifacts DIR to check recorded artifacts"))]
        ids = ["no-artifacts-given"]
    else:
        found = [artifact_file.read(p) for p in artifact_file.expand([where])]
        found.sort(key=lambda a: (a.case, a.dtype))  # the local runs of one case and dtype are reused
        params = [str(a.path) for a in found] or [None]
        named = (lambda p: str(p.relative_to(where))) if Path(where).is_dir() else (lambda p: p.name)
        ids = [named(a.path) for a in found] or ["empty"]  # machine-a/..., machine-b/...
    metafunc.parametrize("artifact_path", params, ids=ids)


def test_recorded_artifact(artifact_path, request):
    assert artifact_path is not None, f"no artifacts (*.safetensors) in {request.config.getoption('--artifacts')}"
    art = artifact_file.read(artifact_path)
    chosen = [backends.get(n) for n in request.config.getoption("--backend") or backends.available()]
    outcomes = crossmachine.compare_with_local(art, chosen, request.config.getoption("--device"),
                                            weights=[w for w in [request.config.getoption("--weights")] if w])
    if outcomes[0].status == "not run":
        pytest.skip(outcomes[0].message)  # the checkpoint is not here: nothing to run it on
    assert all(o.ok for o in outcomes), failure_text(outcomes)
    assert any("~" in o.subject and o.status == "ran" for o in outcomes) or not chosen


# -- recording and comparing on this machine --------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    if not LOCAL:
        pytest.skip("needs torch or mlx installed")
    out = tmp_path_factory.mktemp("artifacts")
    args = ["conformance", "record", "--dtype", "float32", "--dtype", "bfloat16", "--only", "test-tiny",
            "--weights", "none", "--no-training", "--out", str(out)]
    for b in LOCAL:
        args += ["--backend", b]
    assert cli.main(args) == 0
    return out


def _one(directory: Path, seed=0, backend=None, dtype="float32") -> Path:
    (path,) = directory.glob(f"test-tiny_seed{seed}_*--{backend or LOCAL[0]}-*-{dtype}.safetensors")
    return path


def _rewrite(src: Path, dest: Path, tensors=None, **meta) -> Path:
    """A copy of an artifact with some tensors or metadata changed."""
    art = artifact_file.read(src)
    t = artifact_file.tensors_of(art.run, art.tokens, art.targets)
    t.update(tensors or {})
    return artifact_file.write(dest, t, {**art.meta, **meta})


def test_record_writes_one_self_describing_artifact_per_backend_dtype_case(recorded):
    files = sorted(recorded.glob("*.safetensors"))
    assert len(files) == 2 * 2 * len(LOCAL)  # two seeds of test-tiny, two dtypes
    art = artifact_file.read(_one(recorded, dtype="bfloat16"))
    m = art.meta
    case = Case("test-tiny", 0, batch=3, length=16)
    ckpt = case.checkpoint()
    assert m["case"] == case.id and m["dtype"] == "bfloat16" and m["backend"] == LOCAL[0]
    assert m["spec_version"] == "1" and m["synthetic"] == "true" and m["gptspec_version"]
    assert m["fingerprint"] == fingerprint(ckpt.spec, ckpt.params) and m["fingerprint"].startswith("sha256:")
    assert json.loads(m["model_spec"]) == json.loads(ckpt.spec.to_json())
    assert m["framework"].startswith(LOCAL[0]) and m["device"] == backends.get(LOCAL[0]).devices()[0]
    assert set(json.loads(m["machine"])) >= {"platform", "processor", "python"}
    tokens, targets = case.inputs(ckpt.spec)
    assert art.tokens.dtype == np.int64 and np.array_equal(art.tokens, tokens) and np.array_equal(art.targets, targets)
    assert art.run.logits.dtype == np.float32 and art.run.logits.shape == (3, 16, ckpt.spec.vocab_size)
    assert set(art.run.grads) == {p.name for p in param_table(ckpt.spec)}
    assert all(g.dtype == np.float32 for g in art.run.grads.values())
    assert np.isfinite(art.run.loss)


def test_fingerprint_is_of_the_weights():
    spec = Case("test-tiny").spec
    params = Case("test-tiny").checkpoint().params
    assert fingerprint(spec, params) == fingerprint(spec, {k: v.copy() for k, v in params.items()})
    changed = dict(params, **{"ln_f.bias": params["ln_f.bias"] + np.float32(1e-7)})
    assert fingerprint(spec, changed) != fingerprint(spec, params)
    assert fingerprint(spec, params) != fingerprint(spec, Case("test-tiny", seed=1).checkpoint().params)


def test_compare_passes_and_writes_the_report(recorded, tmp_path, capsys):
    code = cli.main(["conformance", "compare", str(recorded), "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "comparisons within tolerance" in out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Result: **PASS**" in md and not any("**FAIL**" in line for line in md.splitlines() if line.startswith("| "))
    assert "| tensor | " in md and "vs reference" in md and "| h.0.mlp.c_fc.weight |" in md
    assert "## test-tiny/seed0/B3xT16, float32" in md and "## test-tiny/seed1/B3xT16, bfloat16" in md
    if len(LOCAL) > 1:
        assert "~" in md.split("| tensor | ")[1].splitlines()[0]  # the pairwise column
    pngs = sorted((tmp_path / "report").glob("*.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not pngs and "gptspec[plot]" in md
    else:
        assert len(pngs) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        assert f"]({pngs[0].name})" in md


def test_report_without_matplotlib_says_how_to_get_the_png(recorded, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.delitem(sys.modules, "gptspec.conformance.heatmap", raising=False)
    result = crossmachine.compare([_one(recorded)])
    written, note = write_artifact_report(result, tmp_path)
    assert [p.name for p in written] == ["report.md"] and not list(tmp_path.glob("*.png"))
    assert "pip install 'gptspec[plot]'" in note
    md = (tmp_path / "report.md").read_text()
    assert "pip install 'gptspec[plot]'" in md and "| tensor | " in md


def test_a_tampered_gradient_is_flagged(recorded, tmp_path, capsys):
    src = _one(recorded)
    grad = artifact_file.read(src).run.grads["h.0.mlp.c_fc.weight"]
    tampered = _rewrite(src, tmp_path / "tampered.safetensors",
                        {"grads/h.0.mlp.c_fc.weight": grad * np.float32(1 + 1e-3)})
    others = [p for p in recorded.glob("test-tiny_seed0_*-float32.safetensors") if p != src]
    result = crossmachine.compare([tampered, *others])
    failed = {(o.subject, c.tensor) for o in result.outcomes for c in o.failures}
    assert not result.ok and {t for _, t in failed} == {"h.0.mlp.c_fc.weight"}
    assert any(s.endswith("vs reference") for s, _ in failed)
    assert len(failed) == 1 + len(others)  # against the reference and against every other artifact
    code = cli.main(["conformance", "compare", str(tampered), *map(str, others), "--report", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 1 and "h.0.mlp.c_fc.weight" in out and "FAIL" in out
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Result: **FAIL**" in md
    assert "**FAIL**" in next(line for line in md.splitlines() if line.startswith("| h.0.mlp.c_fc.weight |"))
    # and the --artifacts workflow: against the reference and this machine's backend, both flag it
    outcomes = crossmachine.compare_with_local(artifact_file.read(tampered), [backends.get(LOCAL[0])])
    assert [sorted({c.tensor for c in o.failures}) for o in outcomes] == [["h.0.mlp.c_fc.weight"]] * 2


# -- training trajectories recorded and compared ----------------------------------------------------
TRAJECTORY = "test-tiny/seed0/B2xT16x2/N4"


@pytest.fixture(scope="module")
def recorded_training(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("training")
    assert cli.main(["conformance", "record", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                     "--weights", "none", "--out", str(out)]) == 0
    (path,) = out.glob("test-tiny_seed0_B2xT16x2_N4--torch-*-float32.safetensors")
    return path


def _rewrite_training(src: Path, dest: Path, change) -> Path:
    """A copy of a trajectory artifact with its tensors changed by change(tensors)."""
    art = artifact_file.read(src)
    t = artifact_file.trajectory_tensors(art.trajectory)
    change(t)
    return artifact_file.write(dest, t, art.meta)


def test_a_trajectory_artifact_round_trips_and_compares(recorded_training, tmp_path):
    from gptspec.conformance.trajectory import TrajectoryCase, reference_trajectory

    art = artifact_file.read(recorded_training)
    assert isinstance(art, artifact_file.TrajectoryArtifact)
    m = art.meta
    case = TrajectoryCase("test-tiny", 0, batch=2, length=16, steps=4)
    assert m["kind"] == "trajectory" and m["case"] == TRAJECTORY == case.id and m["dtype"] == "float32"
    assert m["backend"] == "torch" and m["fingerprint"] == fingerprint(case.spec, case.params())
    assert json.loads(m["train_spec"]) == json.loads(case.train_spec("float32").to_json())
    run = art.trajectory
    assert len(run.losses) == len(run.grad_norms) == len(run.lrs) == 4 and sorted(run.states) == [1, 4]
    names = {p.name for p in param_table(case.spec)}
    assert all(set(getattr(run.states[4], g)) == names for g in ("params", "m", "v")) and run.states[4].step == 4
    ref = reference_trajectory(case, "float32")  # the losses the float64 reference computes, to float32's rounding
    assert np.allclose(run.losses, ref.losses, rtol=1e-5) and run.lrs == pytest.approx(ref.lrs, rel=1e-12)
    # a second artifact of the same run (another machine's, say): both against the reference, and the pair
    copy = _rewrite_training(recorded_training, tmp_path / "copy.safetensors", lambda t: None)
    result = crossmachine.compare([recorded_training, copy])
    assert result.ok, failure_text(result.outcomes)
    assert [o.subject for o in result.outcomes] == ["torch/cpu #1 vs reference", "torch/cpu #2 vs reference",
                                                    "torch/cpu #1~torch/cpu #2"]
    assert {c.quantity for c in result.outcomes[0].checks} == {"train_loss", "train_grad_norm", "train_weights",
                                                                "train_m", "train_v"}


def test_a_tampered_trajectory_is_flagged(recorded_training, tmp_path, capsys):
    def scale_loss(t):
        t["losses"] = t["losses"] * np.array([1, 1, 1.01, 1])

    tampered = _rewrite_training(recorded_training, tmp_path / "tampered.safetensors", scale_loss)
    result = crossmachine.compare([recorded_training, tampered])
    failed = {(o.subject, c.quantity, c.tensor) for o in result.outcomes for c in o.failures}
    assert not result.ok and failed == {("torch/cpu #2 vs reference", "train_loss", "step 3"),
                                        ("torch/cpu #1~torch/cpu #2", "train_loss", "step 3")}
    code = cli.main(["conformance", "compare", str(recorded_training), str(tampered)])
    out = capsys.readouterr().out
    assert code == 1 and "training trajectories" in out and "FAIL" in out
    # the --artifacts workflow: against the reference and this machine's torch
    outcomes = crossmachine.compare_with_local(artifact_file.read(tampered), [backends.get("torch")])
    assert [sorted({c.tensor for c in o.failures}) for o in outcomes] == [["step 3"]] * 2


def test_trajectory_artifacts_of_other_batches_are_refused(recorded_training, tmp_path):
    art = artifact_file.read(recorded_training)
    other = artifact_file.write(tmp_path / "other.safetensors", artifact_file.trajectory_tensors(art.trajectory),
                                {**art.meta, "inputs_digest": "sha256:0"})
    with pytest.raises(ArtifactError, match="different inputs_digest"):
        crossmachine.compare([recorded_training, other])
    result = crossmachine.compare([other])  # alone: its batches are not this case's here, so nothing is compared
    assert [o.status for o in result.outcomes] == ["not run"] and "batches differ" in result.notes[0]


@pytest.mark.parametrize("change,message", [
    ("fingerprint", "different checkpoints (fingerprint): sha256:"),
    ("spec_version", "different spec versions: 1 vs 2"),
    ("tokens", "different inputs (tokens: 1 positions differ)"),
    ("targets", "different inputs (targets: shapes"),
    ("model_spec", "different models"),
])
def test_artifacts_that_cannot_be_compared_are_refused(recorded, tmp_path, change, message, capsys):
    a = _one(recorded)
    art = artifact_file.read(a)
    if change == "tokens":
        tokens = art.tokens.copy()
        tokens[0, 0] = (tokens[0, 0] + 1) % 256
        b = _rewrite(a, tmp_path / "b.safetensors", {"tokens": tokens})
    elif change == "targets":
        b = _rewrite(a, tmp_path / "b.safetensors", {"targets": art.targets[:, :8]})
    elif change == "model_spec":
        spec = json.loads(art.meta["model_spec"]) | {"norm_eps": 1e-6}
        b = _rewrite(a, tmp_path / "b.safetensors", model_spec=json.dumps(spec))
    else:
        value = {"fingerprint": "sha256:" + "0" * 64, "spec_version": "2"}[change]
        b = _rewrite(a, tmp_path / "b.safetensors", **{change: value})
    with pytest.raises(ArtifactError) as e:
        crossmachine.compare([a, b])
    assert message in str(e.value) and str(a) in str(e.value) and str(b) in str(e.value)
    assert "refusing to compare" in str(e.value)
    assert cli.main(["conformance", "compare", str(a), str(b)]) == 2
    assert "refusing to compare" in capsys.readouterr().out


def test_an_artifact_of_another_spec_version_is_refused(recorded, tmp_path):
    b = _rewrite(_one(recorded), tmp_path / "b.safetensors", spec_version="2")
    with pytest.raises(ArtifactError, match="written for spec version 2, this gptspec implements 1"):
        crossmachine.compare([b])


def test_a_file_that_is_not_an_artifact_is_refused(tmp_path):
    spec = Case("test-tiny").spec
    save(tmp_path / "w.safetensors", spec, Case("test-tiny").checkpoint().params)
    with pytest.raises(ArtifactError, match="not a gptspec conformance artifact"):
        artifact_file.read(tmp_path / "w.safetensors")
    assert cli.main(["conformance", "compare", str(tmp_path / "missing.safetensors")]) == 2


def test_writes_are_atomic(recorded, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    def killed_midway(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])  # half of it on disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_file, "save_file", killed_midway)
    chosen = [backends.get(LOCAL[0])]
    with pytest.raises(KeyboardInterrupt):
        crossmachine.record(chosen, [Case("test-tiny", 0, batch=3, length=16)], ["float32"], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no artifact, no temporary file
    # a failed overwrite leaves the previous artifact as it was
    target = shutil.copy(_one(recorded), tmp_path / "kept.safetensors")
    before = Path(target).read_bytes()
    with pytest.raises(KeyboardInterrupt):
        _rewrite(_one(recorded), Path(target))
    assert Path(target).read_bytes() == before and sorted(tmp_path.iterdir()) == [tmp_path / "kept.safetensors",
                                                                                  tmp_path / "out"]


def test_out_naming_one_file_needs_one_artifact(tmp_path):
    assert LOCAL, "needs a backend"
    code = cli.main(["conformance", "record", "--backend", LOCAL[0], "--dtype", "float32", "--only", "test-tiny",
                     "--weights", "none", "--out", str(tmp_path / "one.safetensors")])
    assert code == 2 and not (tmp_path / "one.safetensors").exists()


@needs_backend
def test_the_reference_runs_on_the_artifacts_inputs(tmp_path):
    """Inputs other than the case's own (another tokenizer, another input generator) still compare
    like with like: the reference is recomputed on the artifact's tokens and targets."""
    case = Case("test-tiny", 0, batch=3, length=16)
    inputs = crossmachine.inputs_of(case)
    rng = np.random.default_rng(123)
    tokens = rng.integers(0, inputs.spec.vocab_size, inputs.tokens.shape, dtype=np.int64)
    other = runner.Reference(inputs.spec, tokens, inputs.targets, inputs.params, None, None, None, True)
    run = runner.backend_run(backends.get(LOCAL[0]), other, "float32", None)
    meta = artifact_file.read(_record_one(case, tmp_path)).meta  # the case's own inputs
    path = artifact_file.write(tmp_path / "x.safetensors", artifact_file.tensors_of(run, tokens, inputs.targets), meta)
    result = crossmachine.compare([path])
    assert result.ok and result.outcomes[0].status == "ran", failure_text(result.outcomes)
    ref = crossmachine.reference_for(case, "float32", tokens, inputs.targets)
    rounded = {n: round_to_dtype(a, "float32").astype(np.float64) for n, a in inputs.params.items()}
    assert ref.loss == reference.loss_and_grads(inputs.spec, rounded, tokens, inputs.targets).loss


def _record_one(case: Case, where: Path, weights_name=None, backend=None) -> Path:
    (res,) = crossmachine.record([backends.get(backend or LOCAL[0])], [case], ["float32"], where / "rec",
                              weights_name=weights_name)
    assert res.status == "written", res.message
    return res.path


# -- real (non-synthetic) weights: found by name, or the reference is skipped and said so ----------------
@pytest.fixture
def real_weights(tmp_path, monkeypatch):
    """A small canonical checkpoint marked real, named 'tinyreal', in its own weights directory."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("GPTSPEC_WEIGHTS", raising=False)
    cached_checkpoint.cache_clear()
    runner.reference_run.cache_clear()
    yield tmp_path
    cached_checkpoint.cache_clear()
    runner.reference_run.cache_clear()


@needs_backend
def test_real_weights_are_fingerprinted_and_found_by_name(real_weights, monkeypatch, capsys):
    first = real_weights / "first"
    spec = Case("test-tiny").spec
    params = Case("test-tiny", seed=5).checkpoint().params
    save(first / "tinyreal.safetensors", spec, params, synthetic=False, origin="a test")
    case = Case("test-tiny", 0, batch=2, length=8, weights=str(first / "tinyreal.safetensors"))
    paths = [_record_one(case, real_weights, "tinyreal", b) for b in LOCAL]
    meta = artifact_file.read(paths[0]).meta
    assert meta["synthetic"] == "false" and meta["case"] == "test-tiny/weights=tinyreal/B2xT8"
    assert meta["fingerprint"] == fingerprint(spec, params)
    assert meta["weights_path"] == str(first / "tinyreal.safetensors")

    # on "another machine": the weights are elsewhere, found by the recorded name
    moved = real_weights / "elsewhere"
    moved.mkdir()
    (first / "tinyreal.safetensors").rename(moved / "tinyreal.safetensors")
    monkeypatch.setenv("GPTSPEC_WEIGHTS", str(moved))
    result = crossmachine.compare(paths)
    assert result.ok and not result.notes and all(o.status == "ran" for o in result.outcomes)
    assert sum(o.subject.endswith("vs reference") for o in result.outcomes) == len(paths)

    # not found anywhere: the artifacts are still compared with one another, and the skip is said
    monkeypatch.delenv("GPTSPEC_WEIGHTS")
    cached_checkpoint.cache_clear()
    result = crossmachine.compare(paths)
    (note,) = result.notes
    assert "reference comparison skipped" in note and "tinyreal" in note and "--weights" in note
    assert [o.status for o in result.outcomes if "vs reference" in o.subject or "~" not in o.subject] == \
        ["not run"] * len(paths)
    code = cli.main(["conformance", "compare", *map(str, paths)])
    out = capsys.readouterr().out
    assert "reference comparison skipped" in out
    if len(paths) > 1:
        assert result.ok and any(o.status == "ran" and "~" in o.subject for o in result.outcomes) and code == 0
    # named on the command line
    assert cli.main(["conformance", "compare", *map(str, paths), "--weights", str(moved / "tinyreal.safetensors")]) == 0
    assert "skipped" not in capsys.readouterr().out

    # other weights under the recorded name are not used
    save(moved / "tinyreal.safetensors", spec, Case("test-tiny", seed=6).checkpoint().params, synthetic=False)
    monkeypatch.setenv("GPTSPEC_WEIGHTS", str(moved))
    cached_checkpoint.cache_clear()
    (note,) = crossmachine.compare(paths).notes
    assert "different weights here" in note


# -- the command line ---------------------------------------------------------------------------------
def test_the_suite_options_work_before_and_after_the_action():
    p = cli.parser()
    a = p.parse_args(["conformance", "--backend", "torch", "--tier", "heavy", "record", "--out", "d"])
    assert a.func is cli.cmd_conformance_record and a.backend == ["torch"] and a.tier == "heavy" and a.out == "d"
    a = p.parse_args(["conformance", "record", "--out", "d", "--backend", "mlx", "--only", "test-tiny"])
    assert a.backend == ["mlx"] and a.only == ["test-tiny"] and a.tier == "default" and a.weights is None
    a = p.parse_args(["conformance", "compare", "x.safetensors", "y", "--report", "r"])
    assert a.func is cli.cmd_conformance_compare and a.files == ["x.safetensors", "y"] and a.report == "r"
    a = p.parse_args(["conformance", "--dtype", "float32"])
    assert a.func is cli.cmd_conformance and a.action is None and a.dtype == ["float32"]


def test_importing_gptspec_imports_no_plotting_library():
    code = ("import sys, gptspec, gptspec.conformance, gptspec.conformance.artifact_file, "
            "gptspec.conformance.crossmachine, gptspec.conformance.report;"
            "print(sorted(m for m in ('matplotlib', 'torch', 'mlx', 'tinygrad') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@needs_backend
def test_early_exit_artifacts_carry_their_draws_and_stats(tmp_path):
    """SPEC.md 18.3-18.4: the draws are an input like the tokens, and the residual statistics an output."""
    case = Case("test-mini", 0, batch=2, length=48, variant="early-exit")
    (res,) = crossmachine.record([backends.get(LOCAL[0])], [case], ["float32"], tmp_path / "rec")
    assert res.status == "written", res.message
    art = artifact_file.read(res.path)
    assert art.draws is not None and art.draws.shape == (2, 2, 48)
    assert set(art.run.stats) == {"input", "mid", "output", "normed"}
    result = crossmachine.compare([res.path])
    assert result.ok, failure_text(result.outcomes)
    quantities = {c.quantity for o in result.outcomes for c in o.checks}
    assert {"exit_loss", "exit_grads", "stats"} <= quantities
    # other draws are other inputs: the two artifacts cannot be compared with one another
    moved = _rewrite(res.path, tmp_path / "moved.safetensors", {"draws": np.zeros_like(art.draws)})
    with pytest.raises(ArtifactError, match="different inputs"):
        crossmachine.compare([res.path, moved])
