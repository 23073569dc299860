"""The conformance artifact file: one run of one backend, saved to be compared on another machine.

An artifact is one safetensors file per (backend, device, dtype, case): the inputs (`tokens`,
`targets`, int64; `draws`, float64, for the early-exit loss), the backend's `logits` (float32),
`loss` (float64 scalar), `grads/<name>` for every parameter, `stats/<name>` (float64) where the
residual statistics were taken and, where the spec keeps weights unit-norm, `normalized/<name>`
(float32, canonical names), with `__metadata__` saying what ran where (SPEC.md, "Conformance
artifacts"). Recording and comparing them: conformance/crossmachine.py.

A trajectory artifact (metadata kind=trajectory) is one backend's training run of one trajectory case
in one precision (conformance/trajectory.py): per step `losses`, `grad_norms` and `lrs` (float64), and
after each checkpoint step k the optimizer state, `step{k}/count` (int64) and `step{k}/params|m|v/<name>`
(float32, canonical names; the weight change is taken against the case's starting weights, which the
comparing machine recomputes from the case and checks against the recorded fingerprint).
"""
from __future__ import annotations

import hashlib
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

from ..spec import DTYPES, SPEC_VERSION, ModelSpec, SpecError, WeightsError
from ..spec.checks import check_state_shapes
from ..spec.reference.training import TrainState
from ..spec.train import TrainSpec
from ..weights.atomic import atomic_write, is_staging
from .cases import Case
from .runner import Reference, Run
from .trajectory import Trajectory

FORMAT = "gptspec-conformance-artifact"
FORMAT_VERSION = "2"  # 2: a content checksum in the metadata (1 had none, and is refused)
CHECKSUM = "checksum"
TENSORS = ("tokens", "targets", "logits", "loss")  # required; grads/, normalized/, stats/ and draws besides
METADATA = ("backend", "device", "dtype", "spec_version", "model_spec", "case", "case_fields", "fingerprint")
TRAJECTORY = "trajectory"  # the metadata `kind` of a trajectory artifact (a model artifact has none)
TRAJECTORY_TENSORS = ("losses", "grad_norms", "lrs")
TRAJECTORY_METADATA = METADATA + ("train_spec", "inputs_digest")
_GROUPS = ("params", "m", "v")


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


@dataclass
class TrajectoryArtifact:
    """A trajectory artifact read back: its `dtype` is the training precision."""
    path: Path
    meta: dict[str, str]
    trajectory: Trajectory
    spec: ModelSpec
    train_spec: TrainSpec
    label: str = ""

    case = property(lambda self: self.meta["case"])
    dtype = property(lambda self: self.meta["dtype"])
    synthetic = property(lambda self: self.meta.get("synthetic") == "true")


# -- writing and reading ----------------------------------------------------------------------
def machine() -> dict[str, str]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "machine": platform.machine(), "python": platform.python_version()}


def checksum(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """'sha256:<hex>' of an artifact's content: every tensor (name, dtype, shape, little-endian bytes)
    and every metadata entry but the checksum itself, in name order. A one-ulp edit of any value, or a
    relabelled dtype, changes it."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != CHECKSUM):
        h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"tensor\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """Write atomically (weights/atomic.py): a reader sees the previous file or the complete new one.
    The metadata gains the content checksum, which read() checks."""
    path = Path(path)
    tensors = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    metadata = dict(metadata, **{CHECKSUM: checksum(tensors, metadata)})
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# What each stored tensor must be (tensors_of and trajectory_tensors write these), by name prefix
_STORED = (("tokens", "int64"), ("targets", "int64"), ("draws", "float64"), ("loss", "float64"),
           ("logits", "float32"), ("grads/", "float32"), ("normalized/", "float32"), ("stats/", "float64"),
           ("losses", "float64"), ("grad_norms", "float64"), ("lrs", "float64"))


def _stored_dtype(name: str) -> str | None:
    if name.startswith("step") and "/" in name:
        return "int64" if name.endswith("/count") else "float32"
    return next((d for prefix, d in _STORED if name == prefix or (prefix.endswith("/") and name.startswith(prefix))),
                None)


def _check_content(path: Path, meta: dict[str, str], t: dict[str, np.ndarray]) -> None:
    """The checksum (over the tensors and the metadata, the run's `dtype` included) matches, and every
    tensor is stored in the dtype the format gives it (tensors_of, trajectory_tensors)."""
    recorded = meta.get(CHECKSUM)
    if recorded is None:
        raise ArtifactError(f"{path}: no content checksum in its metadata; re-record it with "
                            "`gptspec conformance record --out DIR` (gptspec writes one since format version 2)")
    actual = checksum(t, meta)
    if actual != recorded:
        raise ArtifactError(f"{path}: its content does not match its checksum (recorded {recorded[:23]}..., "
                            f"the file holds {actual[:23]}...): edited or corrupted after it was written")
    wrong = [f"{n} ({a.dtype}, expected {_stored_dtype(n) or 'none: not an artifact tensor'})" for n, a in t.items()
             if str(a.dtype) != _stored_dtype(n)]
    if wrong:
        raise ArtifactError(f"{path}: tensors stored in the wrong dtype: {', '.join(wrong[:5])}")


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


def trajectory_tensors(run: Trajectory) -> dict[str, np.ndarray]:
    out = {"losses": np.asarray(run.losses, np.float64), "grad_norms": np.asarray(run.grad_norms, np.float64),
           "lrs": np.asarray(run.lrs, np.float64)}
    for k, state in run.states.items():
        out[f"step{k}/count"] = np.asarray(int(state.step), np.int64)
        for group in _GROUPS:
            out.update({f"step{k}/{group}/{n}": np.asarray(a, np.float32) for n, a in getattr(state, group).items()})
    return out


def _trajectory_of(path: Path, meta: dict, t: dict) -> TrajectoryArtifact:
    missing = ([k for k in TRAJECTORY_TENSORS if k not in t]
               + [f"metadata {k}" for k in TRAJECTORY_METADATA if k not in meta])
    if missing:
        raise ArtifactError(f"{path}: an incomplete trajectory artifact, missing {', '.join(missing)}")
    try:
        spec, train_spec = ModelSpec.from_json(meta["model_spec"]), TrainSpec.from_json(meta["train_spec"])
    except (SpecError, ValueError) as e:
        raise ArtifactError(f"{path}: no valid model_spec or train_spec in its metadata: {e}") from None
    if not any(k.endswith("/count") for k in t):
        raise ArtifactError(f"{path}: a trajectory artifact without the optimizer state of any checkpoint step")
    for k in (k for k in t if k.startswith("step") and k.endswith("/count")):
        prefix = f"{k[:-len('count')]}params/"
        # the model the artifact claims is paid for by its own tensors, before anything rebuilds it
        check_state_shapes(spec, {n[len(prefix):]: a.shape for n, a in t.items() if n.startswith(prefix)},
                           f"{path} ({prefix})")
    run = Trajectory([float(x) for x in t["losses"]], [float(x) for x in t["grad_norms"]],
                     [float(x) for x in t["lrs"]])
    steps = sorted({int(k.split("/")[0][4:]) for k in t if k.startswith("step") and k.endswith("/count")})
    for k in steps:
        part = lambda prefix: {n[len(prefix):]: v for n, v in t.items() if n.startswith(prefix)}  # noqa: E731
        run.states[k] = TrainState(int(t[f"step{k}/count"]), *(part(f"step{k}/{g}/") for g in _GROUPS))
    return TrajectoryArtifact(path, meta, run, spec, train_spec)


def read(path: str | os.PathLike) -> Artifact | TrajectoryArtifact:
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise ArtifactError(f"{path}: not a gptspec conformance artifact (no format={FORMAT} metadata)")
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: not a readable artifact: {e}") from None
    if meta.get("format_version") == "1":
        raise ArtifactError(f"{path}: artifact format version 1, which carries no content checksum; re-record it "
                            f"with `gptspec conformance record --out DIR` (this gptspec reads format {FORMAT_VERSION})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {meta.get('format_version')!r}, "
                            f"this gptspec reads {FORMAT_VERSION}")
    _check_content(path, meta, t)
    if meta.get("kind") == TRAJECTORY:
        return _trajectory_of(path, meta, t)
    missing = [k for k in TENSORS if k not in t] + [f"metadata {k}" for k in METADATA if k not in meta]
    if missing:
        raise ArtifactError(f"{path}: an incomplete artifact, missing {', '.join(missing)}")
    if meta["dtype"] not in DTYPES:
        raise ArtifactError(f"{path}: records dtype {meta['dtype']!r}, not one of the spec's {', '.join(DTYPES)}")
    try:
        spec = ModelSpec.from_json(meta["model_spec"])
    except SpecError as e:
        raise ArtifactError(f"{path}: no valid model_spec in its metadata: {e}") from None
    part = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
    # every parameter's gradient: the model the artifact claims is paid for by its own tensors
    check_state_shapes(spec, {n: a.shape for n, a in part("grads/").items()}, f"{path} (grads/)")
    run = Run(t["logits"], float(t["loss"].reshape(())), part("grads/"), 0.0, part("normalized/") or None,
              part("stats/") or None)
    return Artifact(path, meta, t["tokens"], t["targets"], run, spec, draws=t.get("draws"))


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories become the artifacts found in them (recursively, sorted)."""
    out = []
    for p in map(Path, paths):
        # unfinished writes (a record still running, or killed) stay out
        out += sorted(f for f in p.rglob("*.safetensors") if not is_staging(f.relative_to(p))) if p.is_dir() else [p]
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


def trajectory_metadata(backend, case, spec: ModelSpec, train_spec: TrainSpec, fp: str, digest: str,
                        device: str) -> dict:
    """A trajectory artifact's `__metadata__`: the case (its fields), model, training run, precision."""
    from .. import __version__

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": TRAJECTORY, "backend": backend.name,
        "device": device, "dtype": train_spec.precision, "framework": backend.version(),
        "gptspec_version": __version__, "spec_version": SPEC_VERSION, "model_spec": spec.to_json(),
        "train_spec": train_spec.to_json(), "case": case.id, "case_fields": json.dumps(asdict(case)),
        "synthetic": "true", "fingerprint": fp, "inputs_digest": digest, "machine": json.dumps(machine()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
