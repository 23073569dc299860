"""Importing gptspec imports no framework; the command line is wired up."""
from __future__ import annotations

import subprocess
import sys


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kw)


def test_import_pulls_in_no_framework():
    code = (
        "import sys, gptspec, gptspec.spec, gptspec.weights, gptspec.backends, gptspec.conformance, gptspec.tokenizer;"
        "gptspec.backends.names();"
        "print(sorted(m for m in ('torch', 'mlx', 'tinygrad', 'transformers') if m in sys.modules))"
    )
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_python_m_gptspec_help():
    out = _run("-m", "gptspec", "--help")
    assert out.returncode == 0 and "conformance" in out.stdout


def test_package_data_is_present():
    from importlib.resources import files

    assert (files("gptspec.spec") / "SPEC.md").is_file()
    assert (files("gptspec.spec") / "tolerances.json").is_file()
    assert (files("gptspec.weights") / "data" / "gpt2.tiktoken").is_file()
    assert (files("gptspec.weights") / "data" / "NOTICE").is_file()
