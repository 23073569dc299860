"""The gptspec command: a table, JSON, exit codes; conversion and synthetic weights."""
from __future__ import annotations

import json
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

    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("GPTSPEC_WEIGHTS", None)
    return env


def test_conformance_command_prints_a_table_and_json(tmp_path, no_real_weights):
    pytest.importorskip("torch")
    out = gptspec("conformance", "--backend", "torch", "--dtype", "float32", "--only", "test-tiny",
                  "--json", str(tmp_path / "r.json"), env=no_real_weights)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Real GPT-2 weights not found" in out.stdout and "SYNTHETIC" in out.stdout
    assert "test-tiny/seed0/B3xT16" in out.stdout and "pass" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    checks = report["outcomes"][0]["checks"]
    assert {c["tensor"] for c in checks} >= {"logits", "loss", "wte.weight", "ln_f.bias"}
    assert all(c["ok"] for c in checks)


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


def test_bad_weights_path_is_a_clear_error(tmp_path):
    out = gptspec("info", str(tmp_path / "missing.safetensors"))
    assert out.returncode == 2 and "no such file" in out.stdout
