"""The gptspec command: a table, JSON, exit codes; conversion and synthetic weights."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gptspec import cli


def gptspec(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptspec", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture
def no_real_weights(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # in this process too
    monkeypatch.delenv("GPTSPEC_WEIGHTS", raising=False)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("GPTSPEC_WEIGHTS", None)
    return env


STREAMED = re.compile(r"^\[(\d+)/(\d+) \d+:\d\d\] (pass|FAIL|ERROR|unsupported|not implemented|not run)")


def test_conformance_command_prints_a_table_and_json(tmp_path, no_real_weights):
    pytest.importorskip("torch")
    out = gptspec("conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                  "--json", str(tmp_path / "r.json"), env=no_real_weights)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SYNTHETIC" in out.stdout
    assert "test-tiny/seed0/B3xT16" in out.stdout and "pass" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    checks = report["outcomes"][0]["checks"]
    assert {c["tensor"] for c in checks} >= {"logits", "loss", "wte.weight", "ln_f.bias"}
    assert all(c["ok"] for c in checks)


def test_generation_rows_appear_in_the_table_and_json(tmp_path, no_real_weights):
    pytest.importorskip("torch")
    out = gptspec("conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                  "--json", str(tmp_path / "r.json"), env=no_real_weights)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "generation (KV cache)" in out.stdout
    streamed = [line for line in out.stdout.splitlines() if line.endswith(")") and " generation: " in line]
    assert len(streamed) == 1 and "cached logits" in streamed[0] and "greedy" in streamed[0], out.stdout
    generation = [o for o in json.loads((tmp_path / "r.json").read_text())["outcomes"] if o["kind"] == "generation"]
    assert [(o["case"], o["subject"], o["status"], o["ok"]) for o in generation] == [
        ("test-tiny/seed0/B3xT16", "torch", "ran", True)]  # generation runs on one seed of a model
    (check,) = generation[0]["checks"]
    assert check["tensor"] == "cached logits" and check["ok"] and check["bound_max"] > 0
    (greedy,) = generation[0]["greedy"]
    assert greedy["ok"]


def test_a_broken_kv_cache_fails_the_command(monkeypatch, capsys, no_real_weights, tmp_path):
    """A cache that forgets what it held (each call starts afresh) gives wrong cached logits, and a
    greedy continuation the reference tells apart."""
    pytest.importorskip("torch")
    from gptspec import backends
    from gptspec.backends.torch.backend import TorchBackend

    class Forgetful(TorchBackend):
        name = "torch"

        def extend(self, model, tokens, cache, last_only=False):
            return super().extend(model, tokens, None, last_only)

    monkeypatch.setattr(backends, "get", lambda name: Forgetful())
    code = cli.main(["conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                     "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 1, out
    failed = [line for line in out.splitlines() if STREAMED.match(line) and " generation: " in line]
    assert len(failed) == 1 and "FAIL" in failed[0], out
    outcomes = json.loads((tmp_path / "r.json").read_text())["outcomes"]
    (generation,) = [o for o in outcomes if o["kind"] == "generation"]
    assert not generation["checks"][0]["ok"] and not generation["greedy"][0]["ok"]
    assert all(o["ok"] for o in outcomes if o["kind"] == "model")  # forward and gradients never use the cache


def test_non_terminal_output_streams_one_plain_line_per_result(no_real_weights):
    """Piped (as in CI logs): no live display, no ANSI escapes; one numbered line per result, in order."""
    pytest.importorskip("torch")
    out = gptspec("conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                  "--no-generation", "--no-training", env=no_real_weights)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "\x1b" not in out.stdout + out.stderr and "\r" not in out.stdout + out.stderr
    lines = [STREAMED.match(line) for line in out.stdout.splitlines()]
    counts = [(int(m[1]), int(m[2])) for m in lines if m]
    assert counts == [(1, 2), (2, 2)], out.stdout  # test-tiny's two seeds, torch, float32
    assert out.stdout.count("test-tiny/seed0/B3xT16") == 2  # its streamed line and its table row


TRAJECTORY = "test-tiny/seed0/B2xT16x2/N4"  # the default tier's GPT-2 trajectory case at test-tiny


def test_training_rows_appear_streamed_in_their_table_and_json(tmp_path, capsys, no_real_weights):
    pytest.importorskip("torch")
    code = cli.main(["conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                     "--no-generation", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    streamed = [line for line in out.splitlines() if STREAMED.match(line) and " training: " in line]
    assert len(streamed) == 1 and f"pass torch {TRAJECTORY} float32 training" in streamed[0], out
    assert [(int(m[1]), int(m[2])) for m in map(STREAMED.match, out.splitlines()) if m][-1] == (3, 3), out
    assert "training trajectories" in out and out.count(TRAJECTORY) == 2  # its streamed line and its row
    training = [o for o in json.loads((tmp_path / "r.json").read_text())["outcomes"] if o["kind"] == "trajectory"]
    # --only narrows the trajectory cases (not the gpt2 one-step case); --dtype float32: float32 training only
    assert [(o["case"], o["subject"], o["dtype"], o["ok"]) for o in training] == [(TRAJECTORY, "torch", "float32", True)]
    quantities = {c["quantity"] for c in training[0]["checks"]}
    assert quantities == {"train_loss", "train_grad_norm", "train_weights", "train_m", "train_v"}
    assert {c["tensor"] for c in training[0]["checks"]} >= {"step 1", "step 4", "step 4: wte.weight"}

    code = cli.main(["conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                     "--no-generation", "--no-training", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and "training" not in out and TRAJECTORY not in out, out
    assert {o["kind"] for o in json.loads((tmp_path / "r.json").read_text())["outcomes"]} == {"model"}


def test_the_dtypes_select_the_training_precisions():
    from gptspec.cli.conformance import _precisions, _trajectory_suite

    def selected(*argv):
        args = cli.parser().parse_args(["conformance", *argv])
        return sorted((c.id, p) for c in _trajectory_suite(args) for p in _precisions(args) if p in c.precisions)

    assert selected("--dtype", "bfloat16", "--only", "test-tiny") == [(TRAJECTORY, "mixed_bfloat16")]
    assert selected("--dtype", "float32", "--only", "test-tiny") == [(TRAJECTORY, "float32")]
    assert selected("--dtype", "float16") == []
    assert selected("--only", "test-tiny", "--no-training") == []
    assert ("gpt2/seed0/B1xT32x1/N1", "float32") in selected("--dtype", "float32")
    assert {i.split(":")[0] for i, _ in selected("--variant", "ngpt", "--variant", "early-exit")} == {"ngpt", "early-exit"}


def test_a_wrong_training_step_fails_the_command(monkeypatch, capsys, no_real_weights, tmp_path):
    """A step that leaves out the weight decay (SPEC.md 20.2) trains other weights: flagged, exit 1."""
    pytest.importorskip("torch")
    from gptspec import backends
    from gptspec.backends.torch.backend import TorchBackend

    class NoDecay(TorchBackend):
        name = "torch"

        def train(self, model, train_spec, batches, draws=None, state=None, **options):
            return super().train(model, train_spec.replace(weight_decay=0.0), batches, draws, state=state, **options)

    from gptspec.conformance import trajectory

    monkeypatch.setattr(backends, "get", lambda name: NoDecay())
    monkeypatch.setattr(trajectory, "_runs", {})  # runs are cached by backend name: not the correct torch's run
    code = cli.main(["conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                     "--no-generation", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 1, out
    outcomes = json.loads((tmp_path / "r.json").read_text())["outcomes"]
    assert all(o["ok"] for o in outcomes if o["kind"] == "model")
    (training,) = [o for o in outcomes if o["kind"] == "trajectory"]
    assert not training["ok"] and {c["quantity"] for c in training["checks"] if not c["ok"]} >= {"train_weights"}


def test_a_selection_that_matches_nothing_is_an_error(capsys, no_real_weights):
    """softmax1 runs on test-mini only in the default tier: --only test-tiny selects nothing."""
    for action in ([], ["record", "--out", "unused"]):
        code = cli.main(["conformance", *action, "--only", "test-tiny", "--variant", "softmax1"])
        out = capsys.readouterr().out
        assert code == 2, out
        assert "matches no case" in out and "test-tiny" in out and "softmax1" in out
        assert "the sizes there are test-mini" in out  # what does exist


def test_real_weights_are_looked_up_only_for_a_gpt2_case(capsys, no_real_weights):
    pytest.importorskip("torch")
    from gptspec.cli.conformance import _selection
    from gptspec.conformance.trained import TrainedCase

    for argv, mentioned in ((["--only", "gpt2"], True), ([], True), (["--only", "test-tiny"], False),
                            (["--variant", "softmax1"], False), (["--variant", "softmax1", "--tier", "heavy"], False)):
        args = cli.parser().parse_args(["conformance", "--backend", "torch", *argv])
        _, suite, _, weights_name = _selection(args)
        out = capsys.readouterr().out
        assert ("Real GPT-2 weights not found" in out) == mentioned, (argv, out)
        # no real GPT-2 case: every case is synthetic but the shipped trained one (conformance/trained.py)
        assert weights_name is None and all(c.synthetic or isinstance(c, TrainedCase) for c in suite)


def test_a_variant_run_does_not_mention_real_weights(capsys, no_real_weights):
    pytest.importorskip("torch")
    code = cli.main(["conformance", "--backend", "torch", "--dtype", "float32", "--variant", "softmax1",
                     "--no-pairwise"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "softmax1:test-mini/seed0/B2xT48" in out and "real gpt-2 weights" not in out.lower()


def test_conformance_exits_non_zero_on_a_failure(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    from gptspec import backends
    from gptspec.backends.torch.backend import TorchBackend

    class Wrong(TorchBackend):
        name = "torch"

        def build(self, spec, params, dtype="float32", device=None):
            model = super().build(spec, params, dtype, device)
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.eps = 1e-3
            return model

    monkeypatch.setattr(backends, "get", lambda name: Wrong())
    code = cli.main(["conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                     "--weights", "none", "--no-pairwise"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_backend_is_a_clear_error(no_real_weights):
    out = gptspec("conformance", "--backend", "jax", env=no_real_weights)
    assert out.returncode == 2 and "unknown backend 'jax'" in out.stdout


def test_synthetic_info_convert(tmp_path):
    out = gptspec("synthetic", "test-mini", str(tmp_path / "hf"), "--seed", "3")
    assert out.returncode == 0 and "SYNTHETIC" in out.stdout
    assert (tmp_path / "hf" / "config.json").exists()
    out = gptspec("convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors"), "--dtype", "bfloat16")
    assert out.returncode == 0, out.stdout
    out = gptspec("info", str(tmp_path / "m.safetensors"))
    assert out.returncode == 0 and "SYNTHETIC" in out.stdout and "bfloat16" in out.stdout
    assert '"n_embd": 64' in out.stdout


def test_synthetic_variant_takes_its_format_from_the_name(tmp_path):
    # README's example: a variant needs a canonical file, which carries its spec
    out = gptspec("synthetic", "test-mini", str(tmp_path / "ngpt-mini"), "--variant", "ngpt")
    assert out.returncode == 2 and "ngpt-mini.safetensors" in out.stdout and not (tmp_path / "ngpt-mini").exists()
    out = gptspec("synthetic", "test-mini", str(tmp_path / "ngpt-mini.safetensors"), "--variant", "ngpt")
    assert out.returncode == 0, out.stdout
    out = gptspec("info", str(tmp_path / "ngpt-mini.safetensors"))
    assert out.returncode == 0 and '"architecture": "ngpt"' in out.stdout, out.stdout


def test_bad_weights_path_is_a_clear_error(tmp_path):
    out = gptspec("info", str(tmp_path / "missing.safetensors"))
    assert out.returncode == 2 and "no such file" in out.stdout


def test_controls_print_each_ratio_and_fail_on_a_control_not_flagged(capsys, monkeypatch):
    pytest.importorskip("torch")
    from gptspec.conformance import controls

    assert cli.main(["conformance", "controls", "--variant", "softmax1"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if re.match(r"\[1/1 \d+:\d\d\] flagged ", line)]
    ratio = float(re.search(r"worst error/bound (\S+) \(logits\)", line)[1])
    assert "softmax1-as-softmax" in line and ratio > 1, out  # the broken model is flagged by its ratio

    harmless = controls.Control("changes-nothing", "softmax1")  # a "bug" the suite cannot and must not flag
    monkeypatch.setattr(controls, "VARIANT_CONTROLS", (harmless,))
    assert cli.main(["conformance", "controls", "--variant", "softmax1"]) == 1
    out = capsys.readouterr().out
    assert "MISSED changes-nothing" in out and "1 of 1 controls missed" in out

    assert cli.main(["conformance", "controls", "--variant", "softmax1", "--only", "gpt2"]) == 2
    assert "no negative control matches --variant softmax1 --only gpt2" in capsys.readouterr().out
