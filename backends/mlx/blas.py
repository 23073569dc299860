"""An optimised BLAS for MLX on Linux, loaded before `mlx.core` is first imported.

The Linux `mlx[cpu]` wheel links a bundled *reference* BLAS: float32 GEMM runs at ~5 GFLOP/s
where torch reaches 110..250 on the same 2 cores, which makes GPT-2 124M nearly unusable. MLX resolves
`cblas_sgemm` when `mlx.core` is loaded, so a BLAS opened earlier with RTLD_GLOBAL supplies the
symbol instead (1024^3 sgemm on 2 cores: 5 -> 110..260 GFLOP/s with OpenBLAS 0.3.21, 190..280 with
mkl 2026.2, varying with the machine's load). macOS is left alone: MLX uses Accelerate.

    GPTSPEC_MLX_BLAS unset or "auto"   the first optimised BLAS found (system OpenBLAS, then PyPI mkl)
    GPTSPEC_MLX_BLAS=off               MLX's bundled BLAS
    GPTSPEC_MLX_BLAS=/path/to/lib.so   exactly that library (an error if it cannot be used)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence

from ...spec import BackendError

ENV_VAR = "GPTSPEC_MLX_BLAS"
OFF = ("off", "0", "false", "no", "none")
AUTO = ("", "auto")
# The one symbol MLX's CPU matmul takes from BLAS; a library without it would change nothing.
REQUIRED_SYMBOL = "cblas_sgemm"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What to load: `paths` in order of preference (the first that works wins), and why.
    `warn` marks the outcome a user should hear about: Linux left with the slow bundled BLAS."""
    paths: tuple[str, ...]
    explicit: bool
    reason: str
    warn: bool = False


_BUNDLED = "MLX's bundled reference BLAS (~50x slower matmuls)"
_INSTALL = "apt-get install libopenblas0-pthread, or pip install mkl"


def plan(setting: str | None, platform: str, mlx_core_loaded: bool, found: Sequence[str]) -> Plan:
    """The decision, free of side effects: the env var's value, sys.platform, whether
    mlx.core is already imported, and the optimised BLAS libraries found on this machine."""
    value = (setting or "").strip()
    if platform == "darwin":
        return Plan((), False, "Accelerate (macOS)")
    if not platform.startswith("linux"):
        return Plan((), False, f"MLX's own BLAS ({platform})")
    if value.lower() in OFF:
        return Plan((), False, f"{_BUNDLED}, as {ENV_VAR}={value} asks")
    if mlx_core_loaded:
        return Plan((), False, f"{_BUNDLED}: mlx.core was imported before gptspec's MLX backend, too "
                               "late to load an optimised BLAS; import gptspec.backends.mlx first", warn=True)
    if value.lower() not in AUTO:
        return Plan((value,), True, f"{ENV_VAR}={value}")
    if found:
        return Plan(tuple(found), False, "found on this machine")
    return Plan((), False, f"{_BUNDLED}: no optimised BLAS found ({_INSTALL})", warn=True)


def find_optimised_blas() -> list[str]:
    """Candidate libraries on this machine, best first: system OpenBLAS, then PyPI mkl's runtime.
    Whether one exports cblas_sgemm is checked when it is opened."""
    patterns = [
        f"{d}/{name}"
        for d in ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
        # Debian/Ubuntu's libopenblas.so.0 is whichever variant update-alternatives chose;
        # Fedora names its pthread and OpenMP builds libopenblasp / libopenblaso.
        for name in ("libopenblas.so.0", "libopenblasp.so.0", "libopenblaso.so.0")
    ] + [f"{sys.prefix}/lib/libmkl_rt.so*"]  # pip install mkl
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            real = os.path.realpath(path)
            if real not in {os.path.realpath(p) for p in found}:
                found.append(path)
    for name in ("openblas", "mkl_rt"):  # anything else the dynamic loader knows (ldconfig)
        soname = ctypes.util.find_library(name)
        if soname and not any(os.path.basename(p) == soname for p in found):
            found.append(soname)
    return found


def _open(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    if not hasattr(lib, REQUIRED_SYMBOL):
        raise OSError(f"{path} does not export {REQUIRED_SYMBOL}")
    return lib


def _describe(path: str, lib: ctypes.CDLL) -> str:
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode(errors="replace").split()  # "OpenBLAS 0.3.21 ..."
        return f"{' '.join(config[:2])} ({path})"
    return path


_in_use: str | None = None


def ensure_loaded() -> str:
    """Load the planned BLAS once per process; returns (and logs) which BLAS MLX uses."""
    global _in_use
    if _in_use is None:
        linux = sys.platform.startswith("linux")
        _in_use = load(plan(os.environ.get(ENV_VAR), sys.platform, "mlx.core" in sys.modules,
                            find_optimised_blas() if linux else []))
    return _in_use


def load(p: Plan) -> str:
    """Carry out a plan: open the first usable library of `p.paths` globally."""
    failures = []
    for path in p.paths:
        try:
            lib = _open(path)
        except OSError as e:
            if p.explicit:
                raise BackendError(f"{ENV_VAR}={path} cannot be used as MLX's BLAS: {e}") from None
            failures.append(str(e))
            continue
        described = _describe(path, lib)
        log.info("MLX uses BLAS %s", described)
        return described
    if failures:
        p = Plan((), False, f"{_BUNDLED}: no usable optimised BLAS ({'; '.join(failures)})", warn=True)
    (log.warning if p.warn else log.info)("MLX uses %s", p.reason)
    return p.reason
