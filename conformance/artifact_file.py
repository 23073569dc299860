"""The conformance artifact file: one run of one backend, saved to be compared on another machine.

An artifact is one safetensors file per (backend, device, dtype, case): the inputs (`tokens`,
`targets`, int64; `draws`, float64, for the early-exit loss), the backend's `logits` (float32),
`loss` (float64 scalar), `grads/<name>` for every parameter, `stats/<name>` (float64) where the
residual statistics were taken and, where the spec keeps weights unit-norm, `normalized/<name>`
(float32, canonical names), with `__metadata__` saying what ran where (SPEC.md, "Conformance
artifacts"). Recording and comparing them: conformance/crossmachine.py.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..spec import SPEC_VERSION, ModelSpec, SpecError, WeightsError
from ..weights.atomic import atomic_write
from .cases import Case
from .runner import Reference, Run

FORMAT = "gptspec-conformance-artifact"
FORMAT_VERSION = "1"
TENSORS = ("tokens", "targets", "logits", "loss")  # required; grads/, normalized/, stats/ and draws besides
METADATA = ("backend", "device", "dtype", "spec_version", "model_spec", "case", "case_fields", "fingerprint")


class ArtifactError(WeightsError):
    """An unreadable artifact, or artifacts that cannot be compared with one another."""


@dataclass
class Artifact:
    path: Path
    meta: dict[str, str]
    tokens: np.ndarray
    targets: np.ndarray
    run: Run
    spec: ModelSpec
    label: str = ""  # how tables name it: backend/device (plus #i when that is ambiguous)
    draws: np.ndarray | None = None  # loss="early_exit"'s uniforms, an input like the tokens

    case = property(lambda self: self.meta["case"])
    dtype = property(lambda self: self.meta["dtype"])
    synthetic = property(lambda self: self.meta.get("synthetic") == "true")


# -- writing and reading ----------------------------------------------------------------------
def machine() -> dict[str, str]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "machine": platform.machine(), "python": platform.python_version()}


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """Write atomically (weights/atomic.py): a reader sees the previous file or the complete new one."""
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def tensors_of(run: Run, tokens: np.ndarray, targets: np.ndarray, draws: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
    out = {"tokens": np.asarray(tokens, np.int64), "targets": np.asarray(targets, np.int64),
           "logits": np.asarray(run.logits, np.float32), "loss": np.asarray(run.loss, np.float64)}
    if draws is not None:
        out["draws"] = np.asarray(draws, np.float64)
    out.update({f"stats/{n}": np.asarray(v, np.float64) for n, v in (run.stats or {}).items()})
    out.update({f"grads/{n}": np.asarray(g, np.float32) for n, g in run.grads.items()})
    out.update({f"normalized/{n}": np.asarray(w, np.float32) for n, w in (run.normalized or {}).items()})
    return out


def read(path: str | os.PathLike) -> Artifact:
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise ArtifactError(f"{path}: not a gptspec conformance artifact (no format={FORMAT} metadata)")
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, FileNotFoundError, IsADirectoryError) as e:
        raise ArtifactError(f"{path}: not a readable artifact: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {meta.get('format_version')!r}, "
                            f"this gptspec reads {FORMAT_VERSION}")
    missing = [k for k in TENSORS if k not in t] + [f"metadata {k}" for k in METADATA if k not in meta]
    if missing:
        raise ArtifactError(f"{path}: an incomplete artifact, missing {', '.join(missing)}")
    try:
        spec = ModelSpec.from_json(meta["model_spec"])
    except SpecError as e:
        raise ArtifactError(f"{path}: no valid model_spec in its metadata: {e}") from None
    part = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
    run = Run(t["logits"], float(t["loss"].reshape(())), part("grads/"), 0.0, part("normalized/") or None,
              part("stats/") or None)
    return Artifact(path, meta, t["tokens"], t["targets"], run, spec, draws=t.get("draws"))


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories become the artifacts found in them (recursively, sorted)."""
    out = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    return out


def file_name(case_id: str, backend: str, device: str, dtype: str) -> str:
    """The artifact's name in a directory: case, backend, device and dtype, safe on every filesystem."""
    slug = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in case_id)
    return f"{slug}--{backend}-{device.replace(':', '')}-{dtype}.safetensors"


def metadata(backend, case: Case, portable_case: Case, inputs: Reference, fp: str, dtype: str, device: str) -> dict:
    """The `__metadata__`: what ran where, the portable case and the checkpoint's fingerprint `fp`."""
    from .. import __version__

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend.name, "device": device,
        "dtype": dtype, "framework": backend.version(), "gptspec_version": __version__,
        "spec_version": SPEC_VERSION, "model_spec": inputs.spec.to_json(), "case": portable_case.id,
        "case_fields": json.dumps(asdict(portable_case)), "weights_path": case.weights or "",
        "synthetic": "true" if inputs.synthetic else "false", "fingerprint": fp,
        "machine": json.dumps(machine()), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
